"""EFCM's protocol: stratified k-fold cross-validation over all bags, out-of-fold outputs pooled per seed and kept
behind the records, and Table 2's costs measured on inputs of one size for teacher and students."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mdbench import efficiency, metrics, notebook, results
from mdbench import samples as S
from mdbench.data.synthetic import SyntheticMILBags
from mdbench.efficiency import count_flops
from mdbench.models.clam import clam_sb
from mdbench.papers.efcm import costs as efcm_costs
from mdbench.papers.efcm import experiment as efcm

warnings.filterwarnings("ignore", message="no local pretrained weights")


# ------------------------------------------------------------------------------------------------ the folds
def _labels(n_pos: int, n_neg: int) -> np.ndarray:
    return np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]


@pytest.mark.parametrize("k, n_pos, n_neg", [(2, 8, 8), (5, 13, 12), (10, 20, 21)])
def test_every_bag_is_tested_once_per_repeat_in_stratified_folds(k, n_pos, n_neg):
    labels = _labels(n_pos, n_neg)
    folds = efcm.fold_index(labels, k, seed=3)
    assert len(folds) == k
    tested = np.concatenate([f["test"] for f in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))  # each bag in exactly one test fold
    for f in folds:
        parts = [f["train"], f["val"], f["test"]]
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))  # disjoint, covering
        assert min(len(p) for p in parts) > 0
        # stratified: each fold's test part holds its share of each class, to within one bag
        for cls, count in ((1, n_pos), (0, n_neg)):
            assert abs((labels[f["test"]] == cls).sum() - count / k) < 1
        # val: one of max(2, k - 1) stratified parts of the other bags (as large as test from k = 3 on)
        assert abs(len(f["val"]) - (len(labels) - len(f["test"])) / max(2, k - 1)) <= 1


def test_folds_are_deterministic_per_seed_and_differ_between_seeds():
    labels = _labels(15, 15)

    def tests(seed):
        return [f["test"].tolist() for f in efcm.fold_index(labels, 5, seed)]

    assert tests(0) == tests(0)
    assert tests(0) != tests(1)
    assert {tuple(t) for t in tests(0)} != {tuple(t) for t in tests(1)}  # other folds, not only another order


def test_pooling_puts_each_fold_output_back_at_its_bag_and_refuses_overlapping_folds():
    labels = np.array([0, 1, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.1, 0.9]])
    folds = [efcm.FoldResult(np.array(t), {"t": {"r": probs[t]}}, {"r": [np.full(2, i) for i in t]},
                             {"kd": float(k)}, {"distill_kd": [k, k / 2]}) for k, t in enumerate([[1, 4], [0, 2, 3]])]
    pooled = efcm.SeedResult.pool(folds, labels)
    assert np.array_equal(pooled.probs["t"]["r"], probs) and pooled.fold.tolist() == [1, 0, 1, 1, 0]
    assert [int(s[0]) for s in pooled.instance_scores["r"]] == [0, 1, 2, 3, 4]
    assert pooled.distill_loss == {"kd": [0.0, 1.0]}
    assert pooled.curves == {"distill_kd": [[0, 0.0], [1, 0.5]]}  # one curve per fold, in fold order
    # one wrong prediction (bag 3) among 5; AUC: positives 0.8, 0.3, 0.9 against negatives 0.1, 0.4: 5 of 6 pairs
    assert pooled.scores("t", "r") == pytest.approx({"accuracy": 80.0, "auc": 100 * 5 / 6})
    folds[1].test_index = np.array([0, 2, 4])
    with pytest.raises(ValueError, match="do not partition"):
        efcm.SeedResult.pool(folds, labels)


# ------------------------------------------------------------------------------- end to end, with the records
def _session(tmp_path):
    return notebook.Session("efcm", "smoke", None, results.ResultStore("efcm", "smoke", root=tmp_path), True, {})


def _synthetic(n: int) -> efcm.BagData:
    return efcm.load_bags("synthetic", n_bags=n, bag_size=(3, 4), patch_size=16)


def test_out_of_fold_outputs_give_the_records_back_through_their_samples(tmp_path):
    data = _synthetic(12)
    cfg = efcm.Config(datasets=("synthetic",), seeds=(0, 1), folds=3, head_hidden=(8, 4), head_epochs=1,
                      distill_epochs=1, distill_batch=16, etc_epochs=1, student_out_index=1, k_sample=1)
    patches = torch.cat([b[0] for b in data.bags])
    features = efcm.split_features(patches.flatten(2).std(dim=2).repeat(1, 2), data.bags)  # a cheap teacher
    run = efcm.run(data, features, cfg)
    assert [s.fold.tolist() for s in run.seeds] != [run.seeds[0].fold.tolist()] * 2  # other folds per seed
    session = _session(tmp_path)
    recorded = efcm.record(data, run, cfg)
    for table, (frame, samples) in recorded.items():
        session.record_frame(table, frame, samples=samples)
    records = {(r.table, r.row, r.metric): r for r in session.store.records()}
    assert len(records) == 2 * (9 + 4)  # accuracy and AUC of 9 Table 1 rows and 4 MIL heads
    auc = records[("table1", "fpd_ts_etc", "auc")]
    lines = session.store.samples(auc)
    assert len(lines) == 2 * 12 and set(lines["unit"]) == set(data.ids)  # every bag once per seed
    for seed, value in zip(auc.seeds, auc.values, strict=True):
        own = lines[lines["seed"] == seed].set_index("unit").loc[data.ids]
        pooled = run.seeds[auc.seeds.index(seed)].probs["table1"]["fpd_ts_etc"]
        assert np.array_equal(own[["prob_0", "prob_1"]].to_numpy(), pooled.astype(np.float64))
        assert value == 100 * metrics.classification_metrics(own["label"], pooled)["auc"]
    assert "3-fold cross-validation over all 12 bags" in auc.notes

    # outputs that are not the ones behind these values (every label flipped) are refused by record_frame
    frame, samples = recorded["table1"]
    with pytest.raises(S.SamplesError):
        _session(tmp_path / "other").record_frame("table1", frame, samples=samples.assign(label=1 - samples["label"]))


def test_feature_bags_train_the_mil_heads_in_every_fold():
    bags = SyntheticMILBags(16, bag_size=(4, 6), feature_dim=5, seed=0)
    data = efcm.BagData("toy", [bags[i] for i in range(16)], "c", [f"b{i}" for i in range(16)], kind="features")
    cfg = efcm.Config(seeds=(0,), folds=4, head_hidden=(8, 4), head_epochs=1, k_sample=1)
    run = efcm.run(data, None, cfg)
    (pooled,) = run.seeds
    assert set(pooled.probs) == {"mil_heads"} and sorted(np.bincount(pooled.fold)) == [4, 4, 4, 4]
    assert all(p.shape == (16, 2) for p in pooled.probs["mil_heads"].values())
    frame, samples = efcm.record(data, run, cfg)["mil_heads"]
    assert len(frame) == 4 * 2 and len(samples) == 4 * 16


def test_bag_ids_must_name_every_bag_once():
    bags = [(torch.zeros(1, 2), 0, None)] * 2
    with pytest.raises(ValueError, match="distinct ids"):
        efcm.BagData("toy", bags, "c", ["a", "a"])


# -------------------------------------------------------------------------------------------- Table 2's costs
class _FixedInput(nn.Module):
    """Stand-in teacher of a fixed 8x8 input: channel means after a conv."""

    input_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_teacher_and_students_are_costed_on_inputs_of_the_teacher_size(monkeypatch):
    monkeypatch.setattr(efficiency, "BACKENDS", ())  # exports have their own tests
    teacher = efcm.PatchEncoder(_FixedInput())
    cfg = efcm.Config(patch_size=4, head_hidden=(8, 4), student_out_index=1, cost_bag_size=10, latency_repeats=1,
                      teacher_batch=2)
    size = efcm_costs.cost_input_size(teacher, cfg.patch_size)
    assert size == 8 and efcm_costs.cost_input_size(efcm.PatchEncoder(nn.Identity()), 4) == 4  # any size: the patch's
    costs = efcm_costs.table2_costs(teacher, 6, cfg)
    for name, student in efcm.students(cfg, 6).items():  # the students at the teacher's 8x8, not at 4x4 tiles
        at_size = count_flops(student.eval(), (torch.rand(1, 3, 8, 8),)).flops / 1e9
        assert costs[f"student_{name}"]["gflops_patch"] == pytest.approx(at_size)
        assert at_size > count_flops(student, (torch.rand(1, 3, 4, 4),)).flops / 1e9
    conv = 2 * 3 * 9 * 6 * 8 * 8 / 1e9  # no resize is counted: the teacher sees 8x8 as given
    assert costs["teacher"]["gflops_patch"] == pytest.approx(conv, rel=0.05)
    frame, repeats = efcm_costs.record_costs(costs, cfg, size)
    assert set(frame["dataset"]) == {"8px inputs, bags of 10"} and set(repeats["unit"]) == {"rep00"}  # 1 repeat
    assert frame["notes"].str.contains("teacher and students alike on 8x8 inputs").all()
    assert all(c["input_size"] == 8 for c in frame["config"])


def test_costs_at_a_size_the_teacher_would_resize_are_refused():
    teacher = efcm.PatchEncoder(_FixedInput())
    with pytest.raises(ValueError, match="not be comparable"):
        efcm_costs.measure_costs({"teacher": teacher}, clam_sb(6, hidden=(4, 2)), input_size=4, bag_size=2, repeats=1)

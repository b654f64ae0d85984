"""Med-Tuning's protocols: the gpu profile's k-fold cross-validation run end to end on the CPU with its sizes shrunk
(every volume scored exactly once per seed, curves per run, records that give back their values, claims over all
volumes), the folds, the fixed split kept as it was (same batches, same recorded config as the committed cpu
results), scoring on a padded volume's own voxels, the config refusing protocols that do not fit, and the cost model's
arithmetic."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import efficiency, metrics, notebook, results, runner, verdicts
from mdbench.papers.med_tuning import cost
from mdbench.papers.med_tuning import experiment as mt
from mdbench.repro import config_hash

from conftest import real_dataset

TINY = {"patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 2}
# only sizes change: the data (synthetic), the backbone, the shapes, the epochs and the device
SHRUNK = {"dataset": "synthetic", "device": "cpu", "backbone": "timm:vit_tiny_patch16_224", "backbone_kwargs": TINY,
          "pretrained": False, "image_size": 16, "num_slices": 8, "decoder_channels": 8, "unet_channels": [4, 8],
          "epochs": 2, "n_volumes": 7}


def profile_config(profile: str, **override) -> mt.Config:
    """The Config the notebook builds at ``profile`` (paper.yaml over the shared profile), with ``override``."""
    return runner.profile_config("med_tuning", profile, mt.Config, **override)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """Every Table 1 and Table 2 row as the notebook runs them, at the gpu profile with its sizes shrunk."""
    cfg = profile_config("gpu", **SHRUNK)
    volumes = mt.load_data(cfg)
    store = results.ResultStore("med_tuning", "gpu", root=tmp_path_factory.mktemp("results"))
    session = notebook.Session("med_tuning", "gpu", cfg, store, False, {})
    config = mt.run_config(cfg, volumes)
    runs = {}
    for row in mt.TABLE1_ROWS:
        runs[row] = mt.run(row, cfg, volumes, cfg.seeds)
        session.record_frame("table1", mt.record(runs[row], volumes, {**config, "row": row}),
                             samples=runs[row].per_volume)
    for row, adapter in mt.ablation_adapters(cfg.ablation_ratios, cfg.adapter_ratio).items():
        if row != "med_tuning":
            runs[row] = mt.run(row, cfg, volumes, cfg.ablation_seeds, adapter)
    return cfg, volumes, runs, store


def test_the_gpu_profile_cross_validates_every_volume_at_its_own_voxels(gpu_run):
    cfg, volumes, _, _ = gpu_run
    assert cfg.folds is not None and cfg.resize == "pad" and cfg.n_train is None and cfg.n_test is None
    assert len(volumes) == SHRUNK["n_volumes"] and set(volumes.split) == {"all"}


def test_every_volume_is_scored_exactly_once_per_seed_by_the_fold_that_held_it_out(gpu_run):
    cfg, volumes, runs, _ = gpu_run
    for row, result in runs.items():
        for seed in result.seeds:
            folds = mt.cv_folds(volumes, cfg.folds, seed)
            held_out = {volumes.ids[i]: k for k, (_, test) in enumerate(folds) for i in test}
            own = result.per_volume[result.per_volume["seed"] == seed]
            for metric in mt.PER_VOLUME:
                lines = own[own["metric"] == metric]
                assert sorted(lines["unit"]) == sorted(volumes.ids), (row, seed, metric)  # each id once
                assert dict(zip(lines["unit"], lines["fold"], strict=True)) == held_out, (row, seed, metric)


def test_each_run_keeps_its_training_curve(gpu_run):
    cfg, _, runs, _ = gpu_run
    for row, result in runs.items():
        curves = result.curves
        assert len(curves) == len(result.seeds) * cfg.folds * cfg.epochs, row
        epochs = curves.groupby(["seed", "fold"])["epoch"].apply(list)
        assert len(epochs) == len(result.seeds) * cfg.folds and all(e == [1, 2] for e in epochs), row
        assert np.isfinite(curves["train_loss"]).all() and (curves["row"] == row).all()
    means = mt.mean_curves(pd.concat([r.curves for r in runs.values()]))
    assert means.shape == (cfg.epochs, len(runs))
    first = runs["full"].curves
    assert means.loc[1, "full"] == pytest.approx(first.loc[first["epoch"] == 1, "train_loss"].mean())


def test_records_over_all_volumes_give_back_their_values_and_claims_pair_every_volume(gpu_run):
    cfg, volumes, _, store = gpu_run
    records = store.records()
    assert {r.row for r in records} == set(mt.TABLE1_ROWS) and all(r.seeds == list(cfg.seeds) for r in records)
    assert all("cross-validation over 7 volumes" in r.notes for r in records)
    assert all(r.config["folds"] == cfg.folds and r.config["n_volumes"] == len(volumes) for r in records)
    claims, _ = verdicts.judge_store(store)
    dice = claims[claims["claim"].isin(["beats_head", "beats_lora", "matches_or_beats_full_ft"])]
    assert (dice["n"] == len(volumes)).all()


def test_folds_partition_the_volumes_and_follow_the_seed():
    volumes = mt.Volumes(torch.zeros(10, 1), torch.zeros(10), np.ones((10, 3)), np.ones((10, 3), dtype=np.int64),
                         [f"v{i}" for i in range(10)], np.full(10, "all"), "toy", "-")
    for seed in (0, 1):
        folds = mt.cv_folds(volumes, 3, seed)
        tests = np.concatenate([test for _, test in folds])
        assert len(folds) == 3 and sorted(tests) == list(range(10))
        assert all(sorted(np.concatenate([train, test])) == list(range(10)) for train, test in folds)
    assert [t.tolist() for _, t in mt.cv_folds(volumes, 3, 0)] != [t.tolist() for _, t in mt.cv_folds(volumes, 3, 1)]
    with pytest.raises(ValueError, match="at least 11 volumes"):
        mt.cv_folds(volumes, 11, 0)
    volumes.split = np.array(["train"] * 7 + ["test"] * 3)
    for seed in (0, 1):  # the fixed split is one fold, whatever the seed
        [(train, test)] = mt.cv_folds(volumes, None, seed)
        assert train.tolist() == list(range(7)) and test.tolist() == [7, 8, 9]


def test_batches_are_the_ones_a_shuffling_dataloader_gives():
    """The fixed-split profiles (cpu, smoke) keep their numbers: the batch sampler draws the generator as
    ``DataLoader(shuffle=True)`` did, batch for batch, epoch after epoch."""
    images, labels = torch.randn(7, 2), torch.arange(7)
    ours = mt._batches(images, labels, 3, torch.Generator().manual_seed(5))
    theirs = DataLoader(TensorDataset(images, labels), batch_size=3, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        for (x, y), (x_ref, y_ref) in zip(ours, theirs, strict=True):
            assert torch.equal(y, y_ref) and torch.equal(x, x_ref)
    assert [y.tolist() for _, y in mt._batches(images, labels, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_the_cpu_profile_records_the_config_of_its_committed_results():
    """Fields added with cross-validation are left out at their defaults: a cpu run records the config (and hash)
    that results/med_tuning/cpu was made with, so those results stay the cpu profile's."""
    committed = json.loads((Path(__file__).parents[1] / "results/med_tuning/cpu/records/"
                            "table1__msd_hippocampus__full__dice_mean.json").read_text())
    cfg = profile_config("cpu")
    assert cfg.folds is None and cfg.resize == "resample"
    n_train, n_test = committed["config"]["n_train"], committed["config"]["n_test"]
    volumes = mt.Volumes(torch.zeros(0), torch.zeros(0), np.zeros((0, 3)), np.zeros((0, 3)), [],
                         np.array(["train"] * n_train + ["test"] * n_test), "msd_hippocampus", "-")
    config = {**mt.run_config(cfg, volumes), "row": "full"}
    assert json.loads(json.dumps(config)) == committed["config"]
    assert config_hash(config) == committed["config_hash"]


class Everywhere(nn.Module):
    """Predicts class 1 at every voxel (logits (B, 3, T, S, S))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 1] = 1
        return logits


def test_a_padded_volume_is_scored_on_its_own_voxels_only():
    labels = torch.zeros(1, 4, 6, 6, dtype=torch.long)
    labels[0, :2, :3, :3] = 1  # 18 anterior voxels inside the volume's own 3 x 4 x 5 corner
    labels[0, 2, 3, 4] = 2
    volumes = mt.Volumes(torch.zeros(1, 1, 4, 6, 6), labels, np.ones((1, 3)), np.array([[3, 4, 5]]), ["v"],
                         np.array(["test"]), "toy", "-")
    scores = mt.evaluate(Everywhere(), volumes, "cpu")
    assert scores["pred"][0, :3, :4, :5].all() and scores["pred"].sum() == 3 * 4 * 5  # background in the padding
    assert scores["dice_anterior"] == pytest.approx(100 * 2 * 18 / (3 * 4 * 5 + 18))  # not / (4 * 6 * 6 + 18)
    assert scores["dice_posterior"] == 0
    # posterior missed: its HD95 is the diagonal of the volume's own 3 x 4 x 5 mm, not of the padded grid's 4 x 6 x 6
    anterior = float(metrics.hd95(scores["pred"], labels, 3)[0, 0])
    assert scores["hd95"] == pytest.approx((anterior + 50 ** 0.5) / 2)


def test_the_config_refuses_a_protocol_that_does_not_fit():
    with pytest.raises(ValueError, match="n_volumes, not n_train"):
        mt.Config(folds=3, n_train=8)
    with pytest.raises(ValueError, match="folds >= 2"):
        mt.Config(folds=1)
    with pytest.raises(ValueError, match="n_volumes sizes the cross-validation"):
        mt.Config(n_volumes=10)
    with pytest.raises(ValueError, match="resize must be one of"):
        mt.Config(resize="crop")


def test_the_cost_model_multiplies_counted_steps_by_the_runs_steps():
    cfg = profile_config("gpu", **{**SHRUNK, "ablation_ratios": []})
    volumes = mt.Volumes(torch.zeros(0), torch.zeros(0), np.zeros((9, 3)), np.zeros((9, 3)),
                         [str(i) for i in range(9)], np.full(9, "all"), "toy", "-")
    estimate = cost.estimate(cfg, volumes, tflops=10.0).set_index("row")
    assert list(estimate.index) == [*mt.TABLE1_ROWS, *mt.ABLATION_SWITCHES]  # Table 2 reuses Med-Tuning's runs
    train, score = cost.step_flops("full", cfg)
    n_train, n_test = 9 * (cfg.folds - 1) / cfg.folds, 9 / cfg.folds
    expected = len(cfg.seeds) * cfg.folds * (train * n_train * cfg.epochs + score * n_test)
    assert estimate.loc["full", "pflop"] * 1e15 == pytest.approx(expected)
    assert estimate.loc["full", "minutes"] == pytest.approx(expected / 10e12 / 60)
    # the meta device counts what a real forward pass computes (a convolutional net: the CPU's fused attention
    # kernel is one FlopCounterMode does not count, so a ViT's CPU count would miss its attention products)
    model = mt.build_row_model("scratch_unet3d", cfg).eval()
    assert cost.step_flops("scratch_unet3d", cfg)[1] == efficiency.count_flops(model, torch.rand(1, 1, 8, 16, 16)).flops
    # a frozen backbone needs no weight gradients: fewer FLOPs a step than full fine-tuning
    assert cost.step_flops("head", cfg)[0] < cost.step_flops("med_tuning", cfg)[0] < train


@pytest.mark.real_data
def test_the_gpu_profile_loads_every_hippocampus_volume_at_its_own_voxels(real_data_dir):
    real_dataset(real_data_dir, "msd_hippocampus")
    cfg = profile_config("gpu", data_dir=str(real_data_dir))
    volumes = mt.load_data(cfg)
    assert volumes.images.shape == (130, 1, cfg.num_slices, cfg.image_size, cfg.image_size)
    assert (volumes.spacing == 1).all() and len(set(volumes.ids)) == 130  # 1 mm voxels, none resampled
    assert volumes.extent.min(axis=0).tolist() == [32, 40, 26] and volumes.extent.max(axis=0).tolist() == [43, 58, 45]
    outside = ~mt._inside(volumes.extent, tuple(volumes.labels.shape[1:]))
    assert not volumes.labels[outside].any() and not volumes.images[:, 0][outside].any()  # zeros around each volume
    assert set(volumes.labels.unique().tolist()) == {0, 1, 2}

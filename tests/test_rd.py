"""Reprogramming Distillation: reprogrammer, frozen FM, student, co-training losses and step."""
from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import notebook, results, train, verdicts
from mdbench.data.registry import load_dataset
from mdbench.data.synthetic import SyntheticClassification
from mdbench.efficiency import count_flops, count_parameters
from mdbench.losses.kd import kd_loss, linear_cka
from mdbench.models import timm_backbones
from mdbench.models.reprogramming import (
    FeatureReprogrammer,
    FrozenFM,
    InputReprogrammer,
    MeanPool,
    PooledEncoder,
    ProjectedStudent,
    RDObjective,
    RDStep,
    ReprogrammingDistillation,
    Standardise,
    build_fm,
    build_projected_student,
)
from mdbench.repro import seed_rngs


def _tiny_fm(dim: int = 8) -> PooledEncoder:
    """A small frozen random conv net standing in for a foundation model: (B, 3, H, W) -> (B, dim)."""
    seed_rngs(0)
    body = nn.Sequential(nn.Conv2d(3, dim, 5, padding=2), nn.BatchNorm2d(dim), nn.ReLU())
    return PooledEncoder(body, MeanPool((2, 3)), dim, None, "tiny")


def _tiny_student(embed_dim: int = 8) -> ProjectedStudent:
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ProjectedStudent(body, 16, embed_dim)


def _rd(reprogram: bool = True, num_classes: int = 3) -> ReprogrammingDistillation:
    return ReprogrammingDistillation(FrozenFM(_tiny_fm()), _tiny_student(), num_classes,
                                     InputReprogrammer(3, 8) if reprogram else None)


def test_reprogrammer_starts_as_identity_keeps_shape_and_refuses_bad_input():
    phi = InputReprogrammer(3, 16)
    x = torch.rand(2, 3, 12, 12)
    assert torch.equal(phi(x), x)
    with torch.no_grad():
        phi.body[-1].weight.normal_()
    assert phi(x).shape == x.shape and not torch.equal(phi(x), x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        phi(torch.rand(2, 1, 12, 12))


def test_frozen_fm_stays_frozen_in_eval_mode_under_a_training_parent():
    model = _rd()
    model.train()
    assert model.student.training and not model.fm.encoder.training
    assert not any(p.requires_grad for p in model.fm.parameters())
    stats = model.fm.encoder.backbone[1].running_mean.clone()
    model(torch.rand(4, 3, 16, 16))
    assert torch.equal(stats, model.fm.encoder.backbone[1].running_mean)


def test_pooled_encoder_resizes_to_its_input_size_and_refuses_grey_images():
    fm = PooledEncoder(nn.Conv2d(3, 4, 1), MeanPool((2, 3)), 4, 8, "toy")
    seen = []
    fm.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    assert fm(torch.rand(2, 3, 20, 20)).shape == (2, 4) and seen == [(2, 3, 8, 8)]
    with pytest.raises(ValueError, match="'toy' takes"):
        fm(torch.rand(2, 1, 8, 8))


def test_forward_shapes_and_gradients_reach_reprogrammer_classifier_student_but_not_fm():
    model = _rd(num_classes=3).train()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    assert out.teacher_logits.shape == out.student_logits.shape == (6, 3)
    assert out.teacher_features.shape == out.student_features.shape == (6, 8)
    losses = RDObjective()(out, y)
    assert set(losses) == {"ce_teacher", "ce_student", "kd", "cka", "total"}
    losses["total"].backward()
    # phi's last convolution starts at zero, so at the first step only it gets a gradient (its input's is zero)
    for part in (model.reprogrammer.body[-1], model.classifier, model.student.backbone, model.student.projector):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in model.fm.parameters())


def test_kd_and_cka_terms_do_not_pull_the_teacher():
    model = _rd().train()
    objective = RDObjective(alpha=1.0, beta=1.0)
    out = model(torch.rand(6, 3, 16, 16))
    losses = objective(out, torch.tensor([0, 1, 2, 0, 1, 2]))
    (losses["kd"] + losses["cka"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.reprogrammer.parameters())
    assert model.student.projector.weight.grad.abs().sum() > 0


def test_objective_total_is_the_weighted_sum_worked_out_by_hand():
    torch.manual_seed(0)
    out = _rd()(torch.rand(5, 3, 16, 16))
    y = torch.tensor([0, 1, 2, 0, 1])
    losses = RDObjective(alpha=0.5, beta=2.0, temperature=3.0)(out, y, scale=0.5)
    ce = nn.functional.cross_entropy
    expected = (ce(out.teacher_logits, y) + ce(out.student_logits, y)
                + 0.25 * kd_loss(out.student_logits, out.teacher_logits, 3.0)
                + 1.0 * (1 - linear_cka(out.student_features, out.teacher_features)))
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "cka" not in RDObjective(beta=0.0)(out, y)


def test_step_decays_weights_linearly_and_counts_training_steps_only():
    step = RDStep(RDObjective(), total_steps=4)
    model = _rd().train()
    batch = (torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    scales = []
    for _ in range(4):
        scales.append(step.scale())
        loss, logs = step(model, batch)
    assert scales == [1.0, 0.75, 0.5, 0.25] and set(logs) == {"ce_teacher", "ce_student", "kd", "cka"}
    model.eval()
    step(model, batch)
    assert step.step == 4
    assert RDStep(RDObjective(), 4, decay=False).scale() == 1.0


def test_cached_features_stand_in_for_the_fm_unless_phi_reprograms_its_input():
    x = torch.rand(4, 3, 16, 16)
    plain = _rd(reprogram=False)
    cached = plain.fm.cache(x, batch_size=3)
    assert cached.shape == (4, 8)
    direct = plain.eval()(x).teacher_logits
    # the cache ran batches of 3 and 1, the direct pass one of 4 (another float order): tolerance by the logits' scale
    torch.testing.assert_close(plain(x, cached).teacher_logits, direct, rtol=0, atol=1e-5 * direct.abs().max().item())
    with pytest.raises(ValueError, match="not valid with a reprogrammer of the FM's input"):
        _rd(reprogram=True)(x, cached)
    on_features = ReprogrammingDistillation(plain.fm, plain.student, 3, FeatureReprogrammer(8, 4)).eval()
    with torch.no_grad():
        on_features.reprogrammer.body[-1].weight.normal_()
    out = on_features(x, cached)
    torch.testing.assert_close(out.teacher_features, on_features.reprogrammer(cached))
    torch.testing.assert_close(on_features(x).teacher_features, out.teacher_features, rtol=0,
                               atol=1e-5 * out.teacher_features.abs().max().item())


def test_feature_reprogrammer_starts_as_identity_trains_and_refuses_bad_input():
    phi = FeatureReprogrammer(8, 4)
    z = torch.randn(5, 8)
    assert torch.equal(phi(z), z)
    phi(z).pow(2).sum().backward()
    assert phi.body[-1].weight.grad.abs().sum() > 0  # the zero layer still learns
    with pytest.raises(ValueError, match=r"\(B, 8\) features"):
        phi(torch.randn(5, 7))
    with pytest.raises(ValueError, match="dim and hidden"):
        FeatureReprogrammer(0, 4)


def test_mismatched_widths_refused():
    with pytest.raises(ValueError, match="embed_dim=8"):
        ReprogrammingDistillation(FrozenFM(_tiny_fm(8)), _tiny_student(embed_dim=5), 3)


def test_deployed_student_holds_only_student_projector_and_classifier():
    model = _rd()
    deployed = model.deployed()
    assert deployed(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    counts = count_parameters(model, deployed_modules=deployed)
    expected = sum(p.numel() for m in (model.student, model.classifier) for p in m.parameters())
    assert counts.deployed == expected < counts.total
    assert counts.trainable == counts.total - sum(p.numel() for p in model.fm.parameters())


def test_co_training_beats_untrained_on_tiny_synthetic_data():
    def tensors(split, n):
        data = SyntheticClassification(n, num_classes=2, image_size=16, seed=0, split=split)
        return torch.stack([data[i][0] for i in range(n)]), torch.as_tensor(data.labels)

    (x_train, y_train), (x_test, y_test) = tensors("train", 128), tensors("test", 128)
    seed_rngs(0)
    model = ReprogrammingDistillation(FrozenFM(_tiny_fm()), _tiny_student(), 2, InputReprogrammer(3, 8))
    deployed = model.deployed()

    def accuracy():
        logits, _ = train.predict(deployed, DataLoader(TensorDataset(x_test, y_test), batch_size=64))
        return (logits.argmax(1) == y_test).float().mean().item()

    before = accuracy()
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    history = train.fit(model, loader, step_fn=RDStep(RDObjective(), total_steps=12 * 4), epochs=12, lr=1e-2,
                        progress=False)
    after = accuracy()
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    assert after > max(before, 0.5) + 0.15, (before, after)


def test_build_fm_litemedsam_stem_shapes_and_bad_names():
    fm = build_fm("litemedsam_stem")
    assert fm.mdbench_init.startswith("pretrained:") and fm.feature_dim == 128
    with torch.no_grad():
        assert fm(torch.rand(2, 3, 16, 16)).shape == (2, 128)
    with pytest.raises(ValueError, match="256x256 input only"):
        build_fm("litemedsam", input_size=64)
    with pytest.raises(ValueError, match="unknown foundation model 'sam'"):
        build_fm("sam")
    with pytest.raises(ValueError, match="no pretrained weights on disk"):
        build_fm("timm:resnet18")


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("mobilenetv3_small_100", 1024),
                                       ("vit_tiny_patch16_224", 192)])
def test_build_projected_student_by_timm_name(name, dim):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no local weights: random init, said in mdbench_init
        student = build_projected_student(name, embed_dim=128, image_size=32, pretrained=False)
    features, projected = student.eval()(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, dim) and projected.shape == (2, 128)
    assert student.mdbench_init == "random init"


# ------------------------------------------------------------------------------------------------- experiment glue
from mdbench.papers.rd import budget  # noqa: E402  (kept beside the tests that use it)
from mdbench.papers.rd import experiment as rdx  # noqa: E402


def _tiny_task(fraction: float = 1.0, seed: int = 0) -> tuple[rdx.ClassificationData, rdx.Task]:
    data = rdx.load_classification("synthetic", 16, max_train=40, max_test=24, synthetic_classes=2)
    fm = FrozenFM(_tiny_fm())
    rdx.cache_features(data, fm)
    return data, rdx.make_task(data, fm, fraction, seed)


def test_a_student_asked_to_be_pretrained_without_weights_on_disk_stops_the_run(tmp_path, monkeypatch):
    """The gpu records once said pretrained_students while every student had started from random init."""
    monkeypatch.setenv("MDBENCH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(timm_backbones, "find_local_weights", lambda name: None)  # whatever caches this machine has
    _, task = _tiny_task()
    random = rdx.initial_student("resnet18", task, 0, rdx.Config(pretrained_students=False))
    assert random.mdbench_init == "random init" and not rdx.Config().pretrained_students  # the default says so
    with pytest.raises(FileNotFoundError, match=r"pretrained_students is set, but the student 'resnet18' has no "
                                                r"weights on disk \(looked in: .*" + str(tmp_path)):
        rdx.initial_student("resnet18", task, 0, rdx.Config(pretrained_students=True))


def test_load_classification_synthetic_shapes_and_sizes_required():
    data, task = _tiny_task()
    assert data.train.x.shape == (40, 3, 16, 16) and data.test.x.shape == (24, 3, 16, 16)
    assert data.train.features.shape == (40, 8) and data.num_classes == 2 and len(data.checksum) == 64
    assert np.array_equal(data.test.ids, np.arange(24))  # the synthetic test split's item indices
    assert np.array_equal(data.test.subset(torch.tensor([3, 5])).ids, [3, 5])
    with pytest.raises(ValueError, match="one distinct id per image"):
        rdx.Split(data.test.x[:2], data.test.y[:2], np.array([7, 7]))
    with pytest.raises(ValueError, match="needs max_train and max_test"):
        rdx.load_classification("synthetic", 16)


def test_label_subset_is_stratified_seeded_and_refuses_bad_fractions():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    subset = rdx.label_subset(y, 0.1, seed=0)
    assert len(subset) == 10 and torch.bincount(y[subset]).tolist() == [5, 3, 2]
    assert torch.equal(subset, rdx.label_subset(y, 0.1, seed=0))
    assert not torch.equal(subset, rdx.label_subset(y, 0.1, seed=1))
    assert len(rdx.label_subset(torch.tensor([0, 1] * 5), 0.01, seed=0)) == 2  # at least one image per class
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        rdx.label_subset(y, 0.0, seed=0)
    assert rdx.fraction_label("pbc", 0.1) == "pbc-10pct" and rdx.fraction_label("pbc", 1.0) == "pbc"


def test_make_task_needs_cached_features():
    data = rdx.load_classification("synthetic", 16, max_train=8, max_test=8)
    with pytest.raises(ValueError, match="cache_features"):
        rdx.make_task(data, FrozenFM(_tiny_fm()), 1.0, 0)


def test_precise_bn_sets_statistics_to_the_training_images_exact_mean_and_variance():
    images = torch.rand(300, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    norm = nn.BatchNorm2d(3)
    rdx._precise_bn(norm, images, rdx.Config())
    # one batch of 256 and one of 44 images: the cumulative average of the two batches' statistics
    batches = (images[:256], images[256:])
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(1) for b in batches]).mean(0)
    assert torch.allclose(norm.running_mean, mean, atol=1e-5) and torch.allclose(norm.running_var, var, atol=1e-5)
    assert norm.momentum == 0.1  # restored after the exact averaging


def test_student_methods_start_from_the_same_weights_and_return_scores():
    _, task = _tiny_task(fraction=0.5)
    cfg = rdx.Config(steps=2, batch_size=8)
    initial = ProjectedStudent(_tiny_student().backbone, 16, 8)
    teacher = rdx.run_fm_method("fm_linear_probe", task, 0, cfg)
    assert teacher.train_logits.shape == (20, 2)
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    for method in rdx.STUDENT_METHODS:
        result = rdx.run_student_method(method, task, initial, 0, cfg, teacher.train_logits)
        assert 0 <= result.test.metrics["accuracy"] <= 100 and 0 <= result.test.metrics["auc"] <= 100
        assert result.test.probs.shape == (24, 2) and np.allclose(result.test.probs.sum(1), 1)
        assert result.model(task.test.x[:2]).shape == (2, 2)
        assert ("teacher" in result.extra) == (method == "rd")
    assert all(torch.equal(before[k], v) for k, v in initial.state_dict().items())  # trained on copies
    with pytest.raises(ValueError, match="needs teacher_logits"):
        rdx.run_student_method("kd", task, initial, 0, cfg)
    with pytest.raises(ValueError, match="unknown student method 'dkd'"):
        rdx.run_student_method("dkd", task, initial, 0, cfg)


def test_full_fine_tuning_trains_a_copy_and_leaves_the_frozen_fm_alone():
    _, task = _tiny_task()
    frozen = {k: v.clone() for k, v in task.fm.state_dict().items()}
    result = rdx.run_fm_method("fm_full_ft", task, 0, rdx.Config(steps=2, batch_size=8, fm_lr=1e-2))
    assert result.train_logits.shape == (40, 2)
    assert all(torch.equal(frozen[k], v) for k, v in task.fm.state_dict().items())
    tuned = result.model.encoder.state_dict()
    assert any(not torch.equal(frozen[f"encoder.{k}"], v) for k, v in tuned.items() if v.is_floating_point())


def test_lora_on_the_stem_trains_only_adapters_and_head_and_vpt_needs_attention():
    data = rdx.load_classification("synthetic", 16, max_train=16, max_test=8, synthetic_classes=2)
    fm = FrozenFM(build_fm("litemedsam_stem", 16))
    task = rdx.make_task(rdx.cache_features(data, fm), fm, 1.0, 0)
    model = rdx._adapted_fm("fm_lora", task, rdx.Config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    assert not model.train().encoder.backbone[0].seq[0].bn.training  # frozen BatchNorm statistics stay fixed
    result = rdx.run_fm_method("fm_lora", task, 0, rdx.Config(steps=1, batch_size=8))
    assert result.train_logits.shape == (16, 2)
    assert set(rdx.unavailable_methods(["fm_vpt", "fm_lora"], fm)) == {"fm_vpt"}


def test_grid_rows_and_kd_needs_an_fm_teacher(monkeypatch):
    data, task = _tiny_task()
    def tiny(name, task, seed, cfg):
        student = ProjectedStudent(_tiny_student().backbone, 16, 8)
        student.mdbench_init = "random init"
        return student

    monkeypatch.setattr(rdx, "initial_student", tiny)
    cfg = rdx.Config(steps=1, batch_size=8, students=("tiny",), seeds=(0, 1))
    runs = rdx.run(data, task.fm, 1.0, ["fm_linear_probe", "student", "kd", "rd"], cfg, progress=False)
    assert len(runs) == 2 * 5 and set(runs.method) == {"fm_linear_probe", "student", "kd", "rd", "rd_teacher"}
    assert set(runs.kd_teacher) == {"fm_linear_probe"} and set(runs.dataset) == {"synthetic"}
    with pytest.raises(ValueError, match="add fm_full_ft or fm_linear_probe"):
        rdx.run(data, task.fm, 1.0, ["kd"], cfg, progress=False)
    with pytest.raises(ValueError, match="unknown methods"):
        rdx.run(data, task.fm, 1.0, ["dkd"], cfg, progress=False)


def test_deployment_costs_of_a_student_and_the_stem_stand_in():
    costs = rdx.deployment_costs(["resnet18"], 16, 3, 128, ["litemedsam_stem"], latency_repeats=1).set_index("model")
    assert costs.loc["resnet18", "kind"] == "student"
    assert set(costs.input_shape) == {"1x3x16x16"}  # the stem takes any size: the run's
    # resnet18 without its 1000-class head: 11.18M, plus projector 512x128 + 128 and classifier 128x3 + 3
    assert costs.loc["resnet18", "params"] == 11_176_512 + 512 * 128 + 128 + 128 * 3 + 3
    assert (costs.flops > 0).all() and (costs.latency_ms > 0).all()


@pytest.mark.real_data
@pytest.mark.parametrize("name, classes", [("pneumoniamnist", 2), ("pbc", 8), ("isic2017", 3)])
def test_real_datasets_load_as_small_stratified_tensors(real_data_dir, name, classes):
    from conftest import real_dataset

    real_dataset(real_data_dir, name)
    data = rdx.load_classification(name, 16, data_dir=real_data_dir, max_train=2 * classes, max_test=6 * classes)
    assert data.train.x.shape == (2 * classes, 3, 16, 16) and data.num_classes == classes
    assert len(data.test) == 6 * classes and set(data.test.y.tolist()) == set(range(classes))  # stratified
    assert 0 <= data.train.x.min() and data.train.x.max() <= 1
    split = load_dataset(name, split="test", data_dir=real_data_dir, image_size=16, channels=3)
    last = int(data.test.ids[-1])  # ids index the registry's test split, whatever sample of it is kept
    assert last < len(split) and torch.equal(split[last][0].float(), data.test.x[-1])


def test_deployment_costs_measure_every_model_at_the_fixed_size_fm_native_input(monkeypatch):
    def tiny_fm(name, input_size):  # an FM that, like LiteMedSAM, takes one input size only (32 here)
        return PooledEncoder(_tiny_fm().backbone, MeanPool((2, 3)), 8, 32 if name == "fixed" else None, name)

    monkeypatch.setattr(rdx, "build_fm", tiny_fm)
    costs = rdx.deployment_costs(["resnet18"], 16, 3, 8, ["fixed", "any"], latency_repeats=1).set_index("model")
    assert set(costs.input_shape) == {"1x3x32x32"}  # the students and the any-size FM too, not the run's 16 px
    at_32 = count_flops(rdx.DeployedStudent(build_projected_student("resnet18", 8, pretrained=False),
                                            nn.Linear(8, 3)), torch.rand(1, 3, 32, 32)).flops
    assert costs.loc["resnet18", "flops"] == at_32
    assert costs.loc["any", "flops"] == costs.loc["fixed", "flops"]  # the same network, so the same cost
    monkeypatch.setattr(rdx, "build_fm", lambda name, size: PooledEncoder(nn.Identity(), MeanPool((2, 3)), 3,
                                                                          int(name), name))
    with pytest.raises(ValueError, match="different fixed input sizes"):
        rdx.deployment_costs([], 16, 3, 8, ["32", "64"])
    lines, repeats = rdx.record_costs(costs.reset_index(), 3, rdx.Config(image_size=16))
    assert lines.notes.str.startswith("input 1x3x32x32 for every model").all()
    # latency: the median of one repeat (its only line, unit rep00), the same repeat id for every model
    assert repeats.unit.tolist() == ["rep00"] * 3 and set(repeats.metric) == {"latency_ms"}
    latency = lines[lines.metric == "latency_ms"].set_index("row").value
    assert repeats.set_index("row").value.to_dict() == latency.to_dict()
    assert all(c["input_shape"] == "1x3x32x32" and c["trained_image_size"] == 16 for c in lines.config)


def test_records_keep_per_image_outputs_that_reproduce_them_on_the_test_ids_every_row_shares(monkeypatch, tmp_path):
    data = rdx.load_classification("synthetic", 16, max_train=32, max_test=40)
    data.test = data.test.subset(torch.arange(1, 40, 2))  # ids 1, 3, ..., 39: a sample of the split, as real data
    fm = FrozenFM(_tiny_fm())
    rdx.cache_features(data, fm)

    def tiny(name, task, seed, cfg):
        seed_rngs(seed)
        student = ProjectedStudent(_tiny_student().backbone, 16, 8)
        student.mdbench_init = "random init"
        return student

    monkeypatch.setattr(rdx, "initial_student", tiny)
    cfg = rdx.Config(steps=2, batch_size=8, students=("tiny",), seeds=(0, 1), lr=0.05)
    methods = ["fm_linear_probe", "student", "kd", "fitnet", "rkd", "rd"]
    runs = pd.concat([rdx.run(data, fm, f, methods, cfg, progress=False) for f in (1.0, 0.5)], ignore_index=True)
    session = notebook.Session("rd", "smoke", cfg, results.ResultStore("rd", "smoke", root=tmp_path), True, {})
    tables = rdx.record(runs, {"synthetic": data}, cfg, "random init")
    assert tables["spread"].samples is None  # seed-level
    for table, (frame, samples) in tables.items():
        session.record_frame(table, frame, samples=samples)  # refuses outputs that do not give back each value
    records = session.store.records()
    assert len(records) == 2 * 2 * 7 + 2 * 6 + 2  # table1 (2 labels, 7 rows, 2 metrics), spread, gain
    ids = {str(i) for i in range(1, 40, 2)}
    for rec in records:
        outputs = session.store.samples(rec)
        assert (outputs is None) == (rec.table == "spread")
        if outputs is not None:  # one line per test image and seed, named by the image's id in the test split
            assert all(set(outputs[outputs.seed == s].unit) == ids and (outputs.seed == s).sum() == 20
                       for s in (0, 1))
    by_seed = runs.pivot_table(index=["fraction", "seed"], columns="method", values="accuracy")
    gain = {rec.dataset + rec.row: rec for rec in records if rec.table == "gain"}["syntheticrd_gain_50pct/tiny"]
    expected = by_seed.loc[0.5, "rd"] - by_seed.loc[0.5, ["kd", "fitnet", "rkd"]].max(axis=1)
    assert gain.values == pytest.approx(expected.tolist(), abs=1e-9)
    assert gain.notes.startswith("best KD baseline: seed 0 ")


# ------------------------------------------------------------------------------------------------- the gpu grid
def _tiny_initial(name: str, task: rdx.Task, seed: int, cfg: rdx.Config) -> ProjectedStudent:
    """:func:`rdx.initial_student` with a tiny student of seed ``seed``, whatever ``name``."""
    seed_rngs(seed)
    student = ProjectedStudent(_tiny_student().backbone, 16, 8)
    student.mdbench_init = "random init"
    return student


def _batch_recorder(seen: dict[str, list], name: str):
    """A train.fit step that appends each batch's labels (the positions of its images) to ``seen[name]``."""
    def step(model, batch):
        seen[name].append(batch[1].tolist())
        return model(batch[0]).sum(), {}
    return step


@pytest.mark.parametrize("resident", [False, True])
def test_loader_gives_train_fit_the_batches_of_a_dataloader_over_the_tensors(resident):
    # The cpu profile's committed numbers came from DataLoader(TensorDataset(...)); batches gathered from tensors
    # in place must reach train.fit in that order, epoch after epoch (its progress bar makes an extra iterator),
    # whether a DataLoader draws their positions (_Batches) or the loader draws them itself (_ResidentBatches).
    x, y = torch.randn(26, 3), torch.arange(26)
    cfg = rdx.Config(resident_batches=resident)
    seen: dict[str, list] = {"dataloader": [], "rd": []}
    recorder = partial(_batch_recorder, seen)

    reference = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(3))
    train.fit(nn.Linear(3, 1), reference, step_fn=recorder("dataloader"), epochs=3, progress=False, seed=0)
    after_reference = torch.get_rng_state(), reference.generator.get_state()
    loader = rdx._loader((x, y), 8, 3, cfg)
    assert isinstance(loader, rdx._ResidentBatches if resident else rdx._Batches)
    train.fit(nn.Linear(3, 1), loader, step_fn=recorder("rd"), epochs=3, progress=False, seed=0)
    assert len(seen["rd"]) == 9 and seen["rd"] == seen["dataloader"]
    # the same draws from the shuffling generator and the global one: what follows is random alike
    assert torch.equal(loader.generator.get_state(), after_reference[1])
    assert torch.equal(torch.get_rng_state(), after_reference[0])
    torch.manual_seed(5)
    iter(DataLoader(TensorDataset(x), batch_size=8))  # an in-order DataLoader's iterator draws from the global one
    after_in_order = torch.get_rng_state()
    torch.manual_seed(5)
    in_order = [b[1].tolist() for b in rdx._loader((x, y), 8, None, cfg)]
    assert in_order == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24)), [24, 25]]
    assert torch.equal(torch.get_rng_state(), after_in_order)


def test_resident_batches_are_the_dataloaders_in_a_whole_run_and_refuse_a_batch_beyond_the_images(monkeypatch):
    # what a run trains and scores on the CPU does not depend on which loader gathers the batches
    data, task = _tiny_task(fraction=0.5)
    monkeypatch.setattr(rdx, "initial_student", _tiny_initial)
    runs = {resident: rdx.run(data, task.fm, 0.5, ["fm_linear_probe", "kd", "rkd", "rd"],
                              rdx.Config(steps=3, batch_size=8, students=("tiny",), seeds=(0,),
                                         resident_batches=resident, log_every=1 + 2 * resident), progress=False)
            for resident in (False, True)}
    assert len(runs[True]) == 5
    for left, right in zip(runs[False].itertuples(), runs[True].itertuples(), strict=True):
        assert (left.method, left.accuracy, left.auc) == (right.method, right.accuracy, right.auc)
        assert np.array_equal(left.probs, right.probs)
        assert left.curve is None and right.curve is None or np.array_equal(left.curve, right.curve)
    with pytest.raises(ValueError, match="need 1 to 5"):
        rdx._ResidentBatches((torch.zeros(5, 2),), 6, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="1 for in-order batches"):
        rdx._ResidentBatches((torch.zeros(5, 2),), 2, None, "cpu", passes=2)


def test_epochs_of_several_passes_train_on_the_dataloaders_batches_and_log_less_often(monkeypatch):
    # 26 images in batches of 8: 3 a pass; epochs of at least 7 batches make 3 passes (9 batches) an epoch
    x, y = torch.randn(26, 3), torch.arange(26)
    cfg = rdx.Config(resident_batches=True, epoch_batches=7, batch_size=8)
    assert rdx.epoch_passes(26, cfg) == 3 and rdx.epoch_passes(26, rdx.Config(batch_size=8)) == 1
    assert rdx.epoch_passes(4, rdx.Config(resident_batches=True, epoch_batches=7, batch_size=8)) == 7
    seen: dict[str, list] = {"dataloader": [], "rd": []}
    recorder = partial(_batch_recorder, seen)

    reference = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(3))
    train.fit(nn.Linear(3, 1), reference, step_fn=recorder("dataloader"), epochs=5, max_steps=13, progress=False,
              seed=0)
    loader = rdx._loader((x, y), 8, 3, cfg)
    assert len(loader) == 9
    history = train.fit(nn.Linear(3, 1), loader, step_fn=recorder("rd"), epochs=2, max_steps=13, progress=False,
                        seed=0)
    assert len(seen["rd"]) == 13 and seen["rd"] == seen["dataloader"]
    assert [e["step"] for e in history.epochs] == [9, 13]
    with pytest.raises(ValueError, match="needs resident_batches"):
        rdx.Config(epoch_batches=4)
    # a whole run: the same numbers as a DataLoader's, fewer points on its curve (an epoch: 2 passes of 2 batches)
    data, task = _tiny_task(fraction=0.5)
    monkeypatch.setattr(rdx, "initial_student", _tiny_initial)
    runs = [rdx.run(data, task.fm, 0.5, ["student", "rd"], rdx.Config(steps=5, batch_size=8, students=("tiny",),
                                                                      seeds=(0,), **config), progress=False)
            for config in ({}, {"resident_batches": True, "epoch_batches": 3})]
    for left, right in zip(runs[0].itertuples(), runs[1].itertuples(), strict=True):
        assert (left.method, left.accuracy) == (right.method, right.accuracy) and np.array_equal(left.probs,
                                                                                                 right.probs)
        if left.curve is not None:
            assert left.curve[:, 0].tolist() == [2, 4, 5] and right.curve[:, 0].tolist() == [4, 5]
            assert left.curve[-1, 1] == right.curve[-1, 1]  # the last epoch: the 5th step alone, either way


def test_a_fit_on_resident_batches_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    # train.fit keeps the shuffling generator in its checkpoints: a unit of work that resumes draws the same batches
    x, y = torch.randn(26, 3), torch.randn(26, 1)
    cfg = rdx.Config(resident_batches=True, epoch_batches=5, batch_size=8)

    def fitted(epochs: int, folder) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        train.fit(model, rdx._loader((x, y), 8, 3, cfg), loss_fn=nn.functional.mse_loss, epochs=epochs,
                  checkpoint_dir=folder, progress=False, seed=0)
        return model

    fitted(2, tmp_path / "resumed")
    resumed, whole = fitted(4, tmp_path / "resumed"), fitted(4, None)
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)


def test_run_steps_take_the_floor_or_the_epochs_in_full_batches():
    cfg = rdx.Config(steps=200, epochs=8, batch_size=32)
    assert rdx.run_steps(4708, cfg) == 8 * 147  # PneumoniaMNIST: 147 full batches an epoch
    assert rdx.run_steps(67, cfg) == 200        # 2 batches an epoch: the floor
    assert rdx.run_steps(10, rdx.Config(steps=3, epochs=2.5, batch_size=32)) == 3  # one batch of 10 an epoch
    assert rdx.run_steps(4708, rdx.Config(steps=30)) == 30  # no epochs: the steps, as the cpu profile runs
    with pytest.raises(ValueError, match="at least one training image"):
        rdx.run_steps(0, cfg)


def test_config_refuses_unknown_phi_space_and_inconsistent_claim_students():
    with pytest.raises(ValueError, match="phi_space must be one of"):
        rdx.Config(phi_space="latent")
    with pytest.raises(ValueError, match="in both students"):
        rdx.Config(students=("resnet18",), claim_students=("resnet18",))
    with pytest.raises(ValueError, match="not among the datasets"):
        rdx.Config(datasets=("pbc",), claim_students=("vit",), claim_datasets=("isic2017",))
    with pytest.raises(ValueError, match="epochs >= 0"):
        rdx.Config(epochs=-1)
    cfg = rdx.Config(datasets=("pbc", "isic2017"), students=("a",), claim_students=("b",), claim_datasets=("pbc",))
    assert cfg.students_of("pbc") == ["a", "b"] and cfg.students_of("isic2017") == ["a"]


def _gpu_profile_config(**shrunk) -> rdx.Config:
    """The gpu profile's Config as ``mdbench reproduce`` builds it, with ``shrunk`` sizes in place of its own."""
    from mdbench import runner

    params = runner.profile_config("rd", "gpu", rdx.Config)
    assert params.phi_space == "feature" and params.claim_students and params.epochs > 0
    return runner.profile_config("rd", "gpu", rdx.Config, **shrunk)


@pytest.mark.slow
def test_gpu_profile_grid_runs_end_to_end_on_cpu_and_its_plan_matches_what_ran(monkeypatch, tmp_path):
    # the gpu profile with its sizes shrunk: synthetic data at 16 px, the FM's stem, a few steps, 2 seeds, on the CPU
    cfg = _gpu_profile_config(device="cpu", datasets=["synthetic"], claim_datasets=["synthetic"], fm="litemedsam_stem",
                              image_size=16, max_train=40, max_test=16, steps=2, epochs=0.5, batch_size=8, seeds=[0, 1],
                              pretrained_students=False)
    phis = []
    reprogrammer = rdx._reprogrammer
    monkeypatch.setattr(rdx, "_reprogrammer", lambda task, cfg: phis.append(reprogrammer(task, cfg)) or phis[-1])
    fm, data = rdx.load_data(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = pd.concat([rdx.run(data["synthetic"], fm, f, cfg.methods, cfg, progress=False) for f in cfg.fractions],
                         ignore_index=True)
    assert phis and all(isinstance(phi, FeatureReprogrammer) for phi in phis)
    rows = set(zip(runs.dataset, runs.student, runs.method, strict=True))
    labels = ("synthetic", "synthetic-10pct")
    claim_rows = {(label, s, m) for label in labels for s in cfg.claim_students for m in (*rdx.CLAIM_METHODS, "rd_teacher")}
    assert {r for r in rows if r[1] in cfg.claim_students} == claim_rows  # only the claims' rows
    assert {r[2] for r in rows if r[1] == "resnet18"} == set(cfg.methods[1:]) | {"rd_teacher"}
    trained = runs[runs.method != "rd_teacher"]
    n_train = {"synthetic": 40, "synthetic-10pct": 4}
    assert (trained.steps == trained.dataset.map(lambda d: rdx.run_steps(n_train[d], cfg))).all()
    assert all(curve[-1, 0] == steps for curve, steps in zip(trained.curve, trained.steps, strict=True))
    assert (trained.seconds > 0).all()
    # the cost model plans exactly the rows that ran, with their steps
    plan = budget.plan(cfg, {"synthetic": budget.DataSize(40, 16, 2)}, list(cfg.methods),
                       budget.forward_flops(cfg, fm, [*cfg.students, *cfg.claim_students]))
    planned = plan[plan.method != "fm_features"].set_index(["dataset", "student", "method"]).steps
    assert set(planned.index) == {r for r in rows if r[2] != "rd_teacher"}
    assert all(planned[(r.dataset, r.student, r.method)] == r.steps for r in trained.itertuples())
    compared = budget.compare(plan, runs)
    assert set(compared.index) == {"—", *cfg.students, *cfg.claim_students} and (compared.tflops >= 0).all()
    # records, and every student's claims judged on them
    session = notebook.Session("rd", "gpu", cfg, results.ResultStore("rd", "gpu", root=tmp_path), False, {})
    for table, (frame, samples) in rdx.record(runs, data, cfg, fm.encoder.mdbench_init).items():
        session.record_frame(table, frame, samples=samples)
    claims, _ = verdicts.judge_store(session.store)
    judged = claims[claims.status != "not run"]
    for student in (*cfg.students, *cfg.claim_students):
        assert {f"rd_beats_{m}_{student}" for m in rdx.KD_BASELINES} | {f"rd_gain_grows_{student}"} <= set(judged.claim)
    assert not rdx.convergence(runs).isna().any().any()


def test_a_linear_probe_learns_only_on_standardised_features():
    # LiteMedSAM's pooled embedding: channel means ~0.05, spread over images ~0.01 (measured on PBC)
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    raw = 0.05 + 0.01 * torch.randn(200, 16, generator=generator) + 0.01 * y[:, None].float()
    standardised = Standardise.fit(raw[:150])(raw)
    cfg = rdx.Config(steps=80, batch_size=32, lr=2e-3)
    accuracy = {}
    for name, features in (("raw", raw), ("standardised", standardised)):
        seed_rngs(0)
        head = nn.Linear(16, 2)
        rdx._fit(head, (features[:150], y[:150]), rdx._ce_step, cfg, 0, cfg.lr)
        accuracy[name] = rdx._evaluate(head, (features[150:], y[150:]), 2, cfg).metrics["accuracy"]
    assert accuracy["standardised"] >= 90 > accuracy["raw"] + 20, accuracy


def test_a_task_standardises_its_fm_and_cached_features_alike():
    data, task = _tiny_task(fraction=0.5)
    full = rdx.make_task(data, FrozenFM(_tiny_fm()), 1.0, 0).train.features
    assert torch.allclose(full.mean(0), torch.zeros(8), atol=1e-5) and torch.allclose(full.std(0), torch.ones(8))
    with torch.no_grad():  # the live FM path (image-space reprogramming) gives the cached features
        assert torch.allclose(task.fm(task.test.x), task.test.features, atol=1e-4)
    with pytest.raises(ValueError, match="Standardise.fit needs features"):
        Standardise.fit(torch.zeros(1, 8))


def test_an_adapted_fm_standardises_like_its_task_fm():
    _, task = _tiny_task()
    model = rdx._adapted_fm("fm_full_ft", task, rdx.Config()).eval()
    with torch.no_grad():  # before fine-tuning, the head sees the task FM's standardised features
        assert torch.allclose(model.head.weight @ task.test.features[:4].T + model.head.bias[:, None],
                              model(task.test.x[:4]).T, atol=1e-4)

"""EFCM's gpu path on the CPU: batches of zero-padded bags computed as each bag alone, bags held once on a device
(:mod:`mdbench.papers.efcm.bags`), tiles at a stride, and the gpu profile's own configuration run end to end with
its sizes shrunk."""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from mdbench import notebook, results, runner
from mdbench.data.mil import tile_fractions, tile_image
from mdbench.efficiency import count_flops
from mdbench.gpu_monitor import GPUMonitor
from mdbench.models import build_model
from mdbench.models.clam import mil_loss
from mdbench.models.transscan import build_transscan_student
from mdbench.papers.efcm import budget
from mdbench.papers.efcm import experiment as efcm
from mdbench.papers.efcm.bags import BagSet, row_batches

warnings.filterwarnings("ignore", message="no local pretrained weights")

SIZES = [3, 7, 5, 7, 1]  # bags of several sizes, one too small for instance clustering
LABELS = [1, 0, 1, 1, 0]


def _padded(bags: list[torch.Tensor]) -> torch.Tensor:
    """(B, N_max, ...) bags zero-padded."""
    out = torch.zeros(len(bags), max(len(b) for b in bags), *bags[0].shape[1:])
    for i, b in enumerate(bags):
        out[i, :len(b)] = b
    return out


# --------------------------------------------------------------------------------------- batches of bags
@pytest.mark.parametrize("name, n_classes, subtyping", [("clam_sb", 2, False), ("clam_mb", 2, False),
                                                        ("clam_mb", 3, True), ("abmil", 2, False),
                                                        ("max_mil", 2, False), ("max_mil", 3, False)])
def test_a_batch_of_padded_bags_gives_every_bag_its_own_outputs_loss_and_gradients(name, n_classes, subtyping):
    torch.manual_seed(0)
    head = build_model(name, in_dim=6, n_classes=n_classes, hidden=(8, 4), k_sample=2, dropout=0.0,
                       subtyping=subtyping)
    bags = [torch.randn(n, 6) for n in SIZES]
    labels = [y % n_classes for y in LABELS]
    alone = [head(b, y) for b, y in zip(bags, labels, strict=True)]
    batch = head(_padded(bags), labels, SIZES)
    assert batch.logits.shape == (5, n_classes) and batch.instance_scores.shape == (5, 7)
    for i, (out, n) in enumerate(zip(alone, SIZES, strict=True)):
        torch.testing.assert_close(batch.logits[i], out.logits[0])
        torch.testing.assert_close(batch.instance_scores[i, :n], out.instance_scores)
        if out.attention is not None:
            torch.testing.assert_close(batch.attention[i, :, :n], out.attention)
            assert (batch.attention[i, :, n:] == 0).all()  # padding gets no attention
        if out.instance_loss is not None:
            torch.testing.assert_close(batch.instance_loss[i], out.instance_loss)
    assert (batch.instance_loss is None) == (name in ("abmil", "max_mil"))
    # the batch's loss is the bags' mean, and so is its gradient
    loss = mil_loss(batch, torch.tensor(labels))
    torch.testing.assert_close(loss, torch.stack([mil_loss(o, y) for o, y in zip(alone, labels, strict=True)]).mean())
    grads = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)
    each = [torch.autograd.grad(mil_loss(head(b, y), y), list(head.parameters()), allow_unused=True)
            for b, y in zip(bags, labels, strict=True)]
    for k, grad in enumerate(grads):
        if grad is not None:
            mean = sum(g[k] if g[k] is not None else torch.zeros_like(grad) for g in each) / len(bags)
            torch.testing.assert_close(grad, mean)


def test_heads_refuse_lengths_that_do_not_fit_the_batch():
    head = build_model("clam_sb", in_dim=4, hidden=(8, 4))
    with pytest.raises(ValueError, match="lengths"):
        head(torch.randn(2, 3, 4), lengths=[3, 4])
    with pytest.raises(ValueError, match="2 bags need as many labels"):
        head(torch.randn(2, 3, 4), [1])


def test_end_to_end_mil_encodes_a_batch_of_bags_at_once_and_subsamples_each_bag():
    torch.manual_seed(0)
    student = build_transscan_student("fpd", 8, out_index=1).eval()
    calls: list[tuple[int, bool]] = []
    student.register_forward_hook(lambda m, i, o: calls.append((len(i[0]), torch.is_grad_enabled())))
    model = efcm.EndToEndMIL(student, build_model("clam_sb", in_dim=8, hidden=(8, 4), dropout=0.0), max_patches=2)
    bags = [torch.rand(n, 3, 16, 16) for n in (4, 2, 3)]
    model.eval()
    alone = [model(b).logits for b in bags]
    calls.clear()
    together = model(_padded(bags), lengths=[4, 2, 3])
    assert calls == [(9, True)]  # one encoder call over the real patches, none over the padding
    torch.testing.assert_close(together.logits, torch.cat(alone), atol=1e-5, rtol=1e-5)
    calls.clear()
    out = model.train()(_padded(bags), [1, 0, 1], [4, 2, 3])
    # at most 2 patches a bag with gradients (all of the bag of 2), the other 2 + 1 without
    assert calls == [(3, False), (2 + 2 + 2, True)]
    mil_loss(out, torch.tensor([1, 0, 1])).backward()
    assert student.projector[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- held bags
def _bags() -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(n, 2, generator=g), y, None) for n, y in zip(SIZES, LABELS, strict=True)]


def test_a_bag_set_batches_zero_padded_bags_with_their_labels_and_lengths():
    bags = _bags()
    held = BagSet.of(bags)
    batch = held.batch([3, 0])
    assert batch.instances.shape == (2, 7, 2) and batch.lengths == (7, 3) and batch.classes == (1, 1)
    assert torch.equal(batch.instances[1, :3], bags[0][0]) and (batch.instances[1, 3:] == 0).all()
    assert torch.equal(batch.labels, torch.tensor([1, 1]))
    part = held.subset([4, 1])
    assert torch.equal(part.flat(), torch.cat([bags[4][0], bags[1][0]])) and part.labels.tolist() == [0, 0]
    doubled = held.with_instances(held.instances * 2).subset([2])
    assert torch.equal(doubled.flat(), 2 * bags[2][0])
    with pytest.raises(ValueError, match="instances to replace"):
        held.with_instances(held.instances[:3])
    with pytest.raises(ValueError, match="at least one"):
        BagSet(torch.zeros(2, 1), np.array([0]), np.array([3]), np.array([0]))


def test_one_bag_per_batch_draws_the_bags_a_dataloader_over_them_draws():
    bags = [(torch.full((n, 1), float(i)), y, None) for i, (n, y) in enumerate(zip(SIZES, LABELS, strict=True))]
    labels = np.array(LABELS)
    weights = torch.as_tensor(1.0 / np.bincount(labels)[labels], dtype=torch.double)
    generator = torch.Generator().manual_seed(3)
    reference = DataLoader(range(5), batch_size=1, generator=generator,
                           sampler=WeightedRandomSampler(weights, 5, generator=generator))  # type: ignore[arg-type]
    expected = [[int(i) for i in batch] for _ in range(3) for batch in reference]
    generator.manual_seed(3)
    loader = BagSet.of(bags).loader(1, weighted=True, generator=generator)
    drawn = [[int(b.instances[0, 0, 0])] for _ in range(3) for b in loader]  # each bag's instances hold its position
    assert drawn == expected
    batches = list(BagSet.of(bags).loader(2))  # in order, the last batch shorter
    assert [b.lengths for b in batches] == [(3, 7), (5, 7), (1,)]


def test_row_batches_draw_the_order_of_a_shuffled_tensor_dataset():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    generator = torch.Generator().manual_seed(1)
    expected = [b[1].tolist() for _ in range(2) for b in DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True,
                                                                    generator=generator, drop_last=True)]
    generator.manual_seed(1)
    loader = row_batches(x, y, batch_size=3, generator=generator, drop_last=True)
    assert len(loader) == 3 and [b[1].tolist() for _ in range(2) for b in loader] == expected


def test_training_on_batches_of_bags_learns_and_predicts_every_bag():
    from mdbench.data.synthetic import SyntheticMILBags

    data = SyntheticMILBags(60, bag_size=(4, 9), feature_dim=8, seed=1)
    bags = [data[i] for i in range(60)]
    torch.manual_seed(0)
    head = build_model("clam_sb", in_dim=8, hidden=(16, 8), k_sample=2, dropout=0.0)
    history = efcm.train_mil(head, bags[:40], bags[40:50], epochs=15, lr=3e-3, batch_size=8)
    assert len(history.epochs) == 15 and history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    probs, labels, scores = efcm.predict_bags(head, bags[50:], batch_size=4)
    alone = efcm.predict_bags(head, bags[50:])
    np.testing.assert_allclose(probs, alone[0], atol=1e-6)
    assert labels.tolist() == [b[1] for b in bags[50:]] and [len(s) for s in scores] == [len(b[0]) for b in bags[50:]]
    assert (probs.argmax(axis=1) == labels).mean() >= 0.8


# ----------------------------------------------------------------------------------------------- tiling
def test_tiles_at_a_stride_overlap_and_their_lesion_fractions_follow():
    image = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 8, 8)
    tiles = tile_image(image, 4, stride=2)  # 3 x 3 tiles, each overlapping its neighbour by half
    assert tiles.shape == (9, 1, 4, 4)
    torch.testing.assert_close(tiles[1], image[:, 0:4, 2:6])
    torch.testing.assert_close(tiles[5], image[:, 2:6, 4:8])
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[0:4, 0:4] = 1
    assert tile_fractions(mask, 4, stride=2).tolist() == [1.0, 0.5, 0.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert torch.equal(tile_image(image, 4, stride=4), tile_image(image, 4))
    with pytest.raises(ValueError, match="stride 3"):
        tile_image(image, 4, stride=3)  # (8 - 4) / 3 tiles do not cover the image


# ------------------------------------------------------------------------------------------- GPU monitor
def test_gpu_monitor_samples_nvidia_smi_only_on_cuda(monkeypatch, capsys):
    with GPUMonitor("cpu") as idle:
        pass
    idle.report("nothing")
    assert idle.utilisation == [] and idle.mean is None and capsys.readouterr().out == ""

    import subprocess

    from mdbench import gpu_monitor

    readings = ["80, 1024\n", "40, 3072\n"]

    def smi(command, **kwargs):
        assert command[:3] == ["nvidia-smi", "-i", "1"]  # the visible GPU's own name
        if not readings:
            raise subprocess.TimeoutExpired(command, 10)  # no reading: the sampling stops
        return subprocess.CompletedProcess(command, 0, stdout=readings.pop(0))

    monkeypatch.setattr(gpu_monitor.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpu_monitor.subprocess, "run", smi)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with GPUMonitor("cuda:0", interval_s=0.01) as gpu:
        for _ in range(500):  # until the sampler has taken both readings
            if not readings and len(gpu.utilisation) == 2:
                break
            time.sleep(0.01)
    assert gpu.utilisation == [80.0, 40.0] and gpu.mean == 60.0 and gpu.peak == 80.0
    gpu.report("a cell")
    assert "mean 60 % (peak 80 %), 2 samples" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the gpu profile, shrunk
class _PoolTeacher(nn.Module):
    """A cheap fixed teacher of any input size: 4x4 average pooling of the patch (48-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _gpu_config(**shrunk) -> efcm.Config:
    entry = {p.paper: p for p in runner.load_papers()}["efcm"]
    params = {**entry.parameters_for(runner.load_profile("gpu")), **shrunk}
    return efcm.Config.from_params({k: v for k, v in params.items() if k not in notebook.SESSION_PARAMS})


def test_the_gpu_profile_shows_the_teacher_its_tiles_upsampled_2x_not_8x():
    cfg = _gpu_config()
    tile = efcm.BagData("tiles", [(torch.zeros(1, 3, cfg.patch_size, cfg.patch_size), 0, None)], "c", ["a"])
    assert efcm.teacher_input(tile, cfg) == "128 px, resized to 256 px (2x)"
    assert efcm.teacher_input(tile, dataclasses.replace(cfg, teacher="texture")) == "128 px, as they are"
    assert (cfg.isic_grid - 1) * cfg.isic_stride + cfg.patch_size == 256  # the crops cover the stored ISIC image


# the sizes that make the gpu profile take minutes on a GPU (tiles 4x smaller on each side, overlapping as at gpu);
# everything else keeps the gpu profile's value
SHRUNK = {"device": "cpu", "seeds": [0], "folds": 2, "n_bags": 8, "teacher": "texture", "patch_size": 32,
          "isic_stride": 16, "head_epochs": 1, "distill_epochs": 1, "distill_batch": 16, "etc_epochs": 1,
          "head_hidden": [16, 8]}


def test_the_gpu_profile_runs_end_to_end_on_the_cpu_with_its_sizes_shrunk(real_data_dir, tmp_path):
    cfg = _gpu_config(**SHRUNK, data_dir=str(real_data_dir))
    assert cfg.bag_batch > 1 and cfg.etc_max_patches < cfg.isic_grid ** 2  # the gpu path, not the cpu one
    data = efcm.load_data(cfg)
    isic = data["isic2017"]
    assert isic.bags[0][0].shape == (cfg.isic_grid ** 2, 3, cfg.patch_size, cfg.patch_size)
    features, _ = efcm.encode(efcm.PatchEncoder(_PoolTeacher()), data, cfg)
    session = notebook.Session("efcm", "gpu", None, results.ResultStore("efcm", "gpu", root=tmp_path), True, {})
    runs = {}
    for name, d in data.items():
        runs[name] = efcm.run(d, features.get(name), cfg)
        for table, (frame, samples) in efcm.record(d, runs[name], cfg).items():
            session.record_frame(table, frame, samples=samples)
    assert {r.dataset for r in session.store.records()} == {"isic2017", "pbc", "ucsb_breast"}
    curves = runs["isic2017"].seeds[0].curves
    assert set(curves) == {run for kept in efcm.CURVES.values() for run in kept}
    assert all(len(c) == cfg.folds and len(c[0]) == 1 for c in curves.values())
    fig = efcm.plot_curves(runs)
    width, height = fig.get_size_inches()  # a row of panels per patch dataset (ISIC, PBC), not per method
    assert len(fig.axes) == 2 * len(efcm.CURVES) and height < width
    efcm.plot_attention(runs["isic2017"].seeds[0], isic, cfg)
    encoders = ("teacher", "student_kd", "student_fpd", "student_fpd_ts")
    efcm.plot_pareto(runs, {name: {"gflops_bag": 10.0 ** k} for k, name in enumerate(encoders)}, cfg)


def test_small_datasets_train_on_smaller_batches_so_an_epoch_keeps_its_steps():
    assert efcm.steps_batch(128, 900, 8) == 128   # ISIC: 8 steps an epoch at 128 bags, as set
    assert efcm.steps_batch(128, 49, 8) == 6      # PBC: 1 step at 128; 6 bags a step give 9
    assert efcm.steps_batch(256, 611, 8) == 76    # PBC's patches in stage 1: 2 steps at 256, 8 at 76
    assert efcm.steps_batch(1, 5, 8) == 1 and efcm.steps_batch(128, 49, 0) == 128  # at least 1; 0 is off
    assert "min_steps_per_epoch" not in efcm.Config().as_record()  # off: the records made before it keep their config
    assert efcm.Config(min_steps_per_epoch=8).as_record()["min_steps_per_epoch"] == 8
    assert _gpu_config().min_steps_per_epoch == 8


# ------------------------------------------------------------------------------------------- cost model
def test_the_cost_model_counts_each_stage_by_the_protocol():
    data = {"synthetic": efcm.BagData("synthetic", [(torch.rand(4, 3, 8, 8), i % 2, None) for i in range(8)], "c",
                                      [f"b{i}" for i in range(8)])}
    cfg = efcm.Config(seeds=(0,), folds=2, patch_size=8, bag_batch=2, head_epochs=1, distill_epochs=1,
                      distill_batch=4, etc_epochs=1, etc_max_patches=2, student_out_index=1, head_hidden=(8, 4))
    rates = budget.Rates(train_tflops=1e-6, head_step_ms=1e6)  # stages compute-bound, but MIL heads launch-bound
    frame = budget.estimate(cfg, data, efcm.PatchEncoder(nn.Flatten()), rates).set_index("stage")
    assert frame.loc["teacher features (once, cached)", "runs"] == 8 * 4
    # 2 folds: 4 bags outside a test fold, 2 train and 2 validate; 2 bags a step; 4 + 3 heads
    heads = frame.loc["synthetic: 7 MIL heads x 1 epochs"]
    assert heads["bound"] == "launch" and heads["seconds"] == pytest.approx(2 * 7 * (1 + 1) * 1e3)
    student = {v: count_flops(s.eval(), (torch.rand(1, 3, 8, 8),)).flops / 1e9 for v, s in efcm.students(cfg, 256).items()}
    distill = frame.loc["synthetic: stage 1, 3 students x 1 epochs"]  # 2 bags of 4 patches: 2 batches of 4
    assert distill["tflop"] == pytest.approx(2 * 2 * 4 * 3 * sum(student.values()) / 1e3)
    etc = frame.loc["synthetic: ETC, 3 runs x 1 epochs"]  # 2 of 4 patches a bag with gradients
    assert etc["tflop"] == pytest.approx(2 * 3 * (2 * (3 * 2 + 2) + 2 * 4) * student["fpd_ts"] / 1e3)
    assert 30 <= budget.utilisation(frame, rates) <= 95
    # with 2 steps an epoch at least, the 2 training bags go 1 a step, and train_mil validates 1 a step too: 2 + 2
    floor = budget.estimate(dataclasses.replace(cfg, min_steps_per_epoch=2), data, efcm.PatchEncoder(nn.Flatten()),
                            rates).set_index("stage")
    assert floor.loc["synthetic: 7 MIL heads x 1 epochs", "seconds"] == pytest.approx(2 * 7 * (2 + 2) * 1e3)

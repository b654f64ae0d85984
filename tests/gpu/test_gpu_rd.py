"""Reprogramming Distillation on CUDA with mixed precision against the CPU: every FM baseline and student method of
the grid (reprogramming, co-training, KD baselines, evaluation), and LoRA on LiteMedSAM's stem."""
from __future__ import annotations

import warnings

import pandas as pd
import torch
from gpu_compare import MARKS, NUDGE, assert_close, assert_same, assert_same_scale, full_fp32, max_difference
from torch import nn

from mdbench.models.reprogramming import FrozenFM, MeanPool, PooledEncoder, build_fm
from mdbench.papers.rd import experiment as rdx
from mdbench.repro import seed_rngs

pytestmark = MARKS
N_TEST = 64
METHODS = ["fm_linear_probe", "fm_full_ft", *rdx.STUDENT_METHODS]


def _tiny_fm(dim: int = 8) -> FrozenFM:
    """A small frozen random conv net standing in for the foundation model (the grid's cost is the students')."""
    seed_rngs(0)
    body = nn.Sequential(nn.Conv2d(3, dim, 5, padding=2), nn.BatchNorm2d(dim), nn.ReLU())
    return FrozenFM(PooledEncoder(body, MeanPool((2, 3)), dim, None, "tiny"))


def _scored(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Records the (logits, labels) of every test-set evaluation; the labels are what predict brought back."""
    seen = []
    scores = rdx._scores

    def recording(logits, y, num_classes):
        seen.append((logits, y))
        return scores(logits, y, num_classes)

    monkeypatch.setattr(rdx, "_scores", recording)
    return seen


def _grid(device: str, methods: list[str] = METHODS, nudge: float = 0.0, **config) -> pd.DataFrame:
    """The grid of ``methods`` on ``device``; with ``nudge``, every training image scaled by (1 + nudge)."""
    data = rdx.load_classification("synthetic", 16, max_train=64, max_test=N_TEST, synthetic_classes=2)
    data.train.x.mul_(1 + nudge)
    fm = _tiny_fm().to(device)
    cfg = rdx.Config(**{"steps": 4, "batch_size": 16, "pretrained_students": False, "students": ("resnet18",),
                        "seeds": (0,), "datasets": ("synthetic",), "device": device, **config})  # amp follows it
    rdx.cache_features(data, fm, amp=cfg.amp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no local student weights: random init, as on the CPU
        return rdx.run(data, fm, 0.5, methods, cfg, progress=False)


def _assert_evaluations_alike(gpu: list, cpu: list, rel: float | None, noise: list[float] | None = None) -> None:
    """Labels identical; logits within ``rel`` of the CPU's (fp32 runs; or within the CPU's own ``noise``, one per
    evaluation, where larger), or of the CPU's scale (``rel=None``, under mixed precision)."""
    labels = rdx.load_classification("synthetic", 16, max_train=8, max_test=N_TEST).test.y
    assert len(gpu) == len(cpu) > 0
    noise = noise or [0.0] * len(cpu)
    for i, ((logits, y), (cpu_logits, cpu_y)) in enumerate(zip(gpu, cpu, strict=True)):
        assert_same(y, labels, f"test labels of evaluation {i}")
        assert_same(cpu_y, labels, f"CPU test labels of evaluation {i}")
        assert logits.device.type == "cpu" and logits.dtype == cpu_logits.dtype == torch.float32
        if rel is None:
            assert_same_scale(logits, cpu_logits, f"test logits of evaluation {i} (bf16)")
        else:
            assert_close(logits, cpu_logits, rel, f"test logits of evaluation {i}", noise[i])


def _grids_alike(monkeypatch, methods: list[str], **config) -> pd.DataFrame:
    """The grid on the CPU, on CUDA in fp32 (compared closely) and on CUDA with bf16 autocast as the gpu profile
    runs it (labels compared exactly, logits by scale); returns the mixed-precision CUDA grid."""
    seen = _scored(monkeypatch)
    cpu = _grid("cpu", methods, **config)
    cpu_seen = list(seen)
    seen.clear()
    _grid("cpu", methods, NUDGE, **config)
    noise = [max_difference(a, b) for (a, _), (b, _) in zip(cpu_seen, seen, strict=True)]
    with monkeypatch.context() as fp32, full_fp32():
        fp32.setattr(rdx.Config, "amp", property(lambda self: False))
        seen.clear()
        _grid("cuda", methods, **config)
        _assert_evaluations_alike(seen, cpu_seen, 0.1, noise)
    seen.clear()
    gpu = _grid("cuda", methods, **config)
    _assert_evaluations_alike(seen, cpu_seen, None)
    assert gpu[["method", "student", "steps", "seed"]].equals(cpu[["method", "student", "steps", "seed"]])
    assert gpu[["accuracy", "auc"]].apply(lambda v: v.between(0, 100)).all().all()
    return gpu


def test_grid_of_every_method_evaluates_alike_on_cuda(monkeypatch):
    # Issue 15 failed here: the test labels came back from predict as garbage and the metrics refused them.
    gpu = _grids_alike(monkeypatch, METHODS)
    assert set(gpu.method) == {*METHODS, "rd_teacher"}


def test_gpu_profile_grid_evaluates_alike_on_cuda(monkeypatch):
    # The gpu profile's settings: RD reprograms the cached (bf16) features, a claim student trains the claims' rows,
    # epochs set the steps; the data sit on the GPU, batches are drawn there (resident_batches: on the CPU the same
    # batches as a DataLoader's, so the two grids see the same images), an epoch is 2 passes (epoch_batches) and the
    # convolutions run channels-last.
    config = {"phi_space": "feature", "claim_students": ("mobilenetv3_small_100",), "steps": 2, "epochs": 2,
              "resident_batches": True, "epoch_batches": 3, "log_every": 100}
    gpu = _grids_alike(monkeypatch, ["fm_linear_probe", *rdx.STUDENT_METHODS], **config)
    assert set(gpu[gpu.student == "mobilenetv3_small_100"].method) == {*rdx.CLAIM_METHODS, "rd_teacher"}
    assert (gpu.steps[gpu.method != "rd_teacher"] == 4).all()  # 2 epochs of 2 full batches of the 32 images


def _lora(device: str) -> tuple[rdx.MethodResult, torch.Tensor]:
    data = rdx.load_classification("synthetic", 16, max_train=32, max_test=N_TEST, synthetic_classes=2)
    fm = FrozenFM(build_fm("litemedsam_stem", 16)).to(device)
    task = rdx.make_task(rdx.cache_features(data, fm), fm, 1.0, 0)
    cfg = rdx.Config(steps=3, batch_size=16, device=device)
    return rdx.run_fm_method("fm_lora", task, 0, cfg), data.test.features


def test_lora_on_the_litemedsam_stem_alike_on_cuda(monkeypatch):
    seen = _scored(monkeypatch)
    cpu, cpu_features = _lora("cpu")
    cpu_seen = list(seen)
    seen.clear()
    gpu, gpu_features = _lora("cuda")
    assert gpu_features.device.type == "cpu" and gpu_features.dtype == cpu_features.dtype == torch.float32
    assert_close(gpu_features, cpu_features, 1e-2, "cached FM features (TF32 convolutions on CUDA)")
    assert gpu.train_logits.dtype == cpu.train_logits.dtype and gpu.train_logits.device.type == "cpu"
    assert_close(gpu.train_logits, cpu.train_logits, 0.1, "LoRA train logits (the KD teacher)")
    _assert_evaluations_alike(seen, cpu_seen, 0.1)
    trainable = {n for n, p in gpu.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in cpu.model.named_parameters() if p.requires_grad}

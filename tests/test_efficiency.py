"""Efficiency protocol: hand-computed parameter and FLOP counts, latency/memory reports, export parity."""
from __future__ import annotations

import copy
import mmap
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from mdbench import efficiency as eff


def _small_cnn(seed: int = 0) -> nn.Module:
    """(B, 1, 8, 8) -> (B, 3) logits; BatchNorm with non-trivial running stats so eval mode matters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


class _TwoHeads(nn.Module):
    """(B, 10) -> ((B, 3) class logits, (B, 1) score logit)."""

    def __init__(self):
        super().__init__()
        self.cls, self.score = nn.Linear(10, 3), nn.Linear(10, 1)

    def forward(self, x):
        return self.cls(x), self.score(x)


# ------------------------------------------------------------------------------------------ parameters


def test_linear_parameters_and_flops_by_hand():
    layer = nn.Linear(10, 5)
    assert eff.count_parameters(layer).as_dict() == {"total": 55, "trainable": 55, "deployed": 55}
    report = eff.count_flops(layer, torch.randn(3, 10))
    # 2 * batch * in * out = 300: FlopCounterMode counts the matmul only, not the 15 bias additions.
    assert report.flops == 2 * 3 * 10 * 5
    assert report.input_shapes == [(3, 10)]
    assert report.by_module == {"Linear": 300}


def test_conv2d_flops_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)
    x = torch.randn(2, 3, 16, 16)
    out_hw = (16 - 3) // 2 + 1  # 7
    macs = 2 * 8 * out_hw * out_hw * 3 * 3 * 3  # batch * C_out * H_out * W_out * C_in * k * k
    assert conv(x).shape == (2, 8, out_hw, out_hw)
    assert eff.count_flops(conv, x).flops == 2 * macs


def test_count_flops_restores_training_mode_and_leaves_no_grad():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    eff.count_flops(model, torch.randn(2, 4))
    assert model.training and model[1].training
    assert all(p.grad is None for p in model.parameters())

    frozen_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    frozen_bn[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    eff.count_flops(frozen_bn, torch.randn(1, 3, 8, 8))
    assert frozen_bn.training and not frozen_bn[1].training


def test_trainable_count_after_freezing():
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    counts = eff.count_parameters(model)
    assert (counts.total, counts.trainable) == (55 + 12, 12)


def test_deployed_count_with_submodules_counts_shared_parameters_once():
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))
    assert eff.count_parameters(model, deployed_modules=model[0]).deployed == 55
    assert eff.count_parameters(model, deployed_modules=[model[1], model[0], model[0]]).deployed == 67
    with pytest.raises(ValueError, match="deployed_modules"):
        eff.count_parameters(model, deployed_modules=["encoder"])


# --------------------------------------------------------------------------------------------- latency


def test_latency_report_fields_for_module_and_callable():
    model = nn.Linear(10, 5)
    report = eff.measure_latency(model, torch.randn(3, 10), warmup=2, repeats=7)
    assert report.n == 7 and report.warmup == 2
    assert 0 < report.median_ms <= report.p90_ms
    assert report.threads == torch.get_num_threads()
    assert report.device == "cpu" and report.input_shapes == [(3, 10)]

    report = eff.measure_latency(lambda x: time.sleep(0.002), np.zeros((1, 2)), warmup=0, repeats=3)
    assert report.median_ms >= 2.0 and report.n == 3
    assert set(report.as_dict()) >= {"median_ms", "p90_ms", "mean_ms", "n", "threads", "device"}


def test_latencies_are_timed_in_rounds_that_pair_their_repeats():
    calls = []

    def fast(x):
        calls.append("fast")

    def slow(x):
        calls.append("slow")
        time.sleep(0.002)

    reports = eff.measure_latencies({"fast": (fast, np.zeros(1)), "slow": (slow, np.zeros(1))}, warmup=1, repeats=3)
    # warm-up, then each round times every call once, right after an untimed call of the same
    assert calls == ["fast", "slow"] + ["fast", "fast", "slow", "slow"] * 3
    slow_ms = reports["slow"].times_ms
    assert len(slow_ms) == 3 and min(slow_ms) >= 2.0 and reports["slow"].median_ms == float(np.median(slow_ms))
    assert max(reports["fast"].times_ms) < min(slow_ms)
    with pytest.raises(ValueError, match="at least one call"):
        eff.measure_latencies({})


def test_latency_refuses_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        eff.measure_latency(nn.Linear(2, 2), torch.randn(1, 2), repeats=0)
    with pytest.raises(ValueError, match="example inputs"):
        eff.measure_latency(nn.Linear(2, 2), "not a tensor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_latency_and_memory_on_cuda():
    model = nn.Linear(64, 64).cuda()
    report = eff.measure_latency(model, torch.randn(8, 64), warmup=1, repeats=5)
    assert report.device.startswith("cuda") and report.median_ms > 0
    memory = eff.peak_memory(lambda: torch.ones(2**24, device="cuda").sum(), device="cuda")
    assert memory.method == "cuda_max_memory_allocated" and memory.delta_bytes >= 4 * 2**24


# ---------------------------------------------------------------------------------------------- memory


def _hwm_available() -> bool:
    return sys.platform.startswith("linux") and eff._reset_rss_high_water_mark()


@pytest.mark.parametrize("method", ["hwm", "sampling"])
def test_cpu_peak_memory_grows_with_a_big_allocation(method):
    if method == "hwm" and not _hwm_available():
        pytest.skip("the kernel's peak-RSS counter cannot be reset here")
    size = 64 * 2**20  # bytes

    def allocate_big():
        # A fresh anonymous mapping: malloc may hand back pages still resident from earlier tests, mmap cannot.
        with mmap.mmap(-1, size) as block:
            pages = np.frombuffer(block, dtype=np.uint8)
            pages[:] = 1  # touch every page
            time.sleep(0.02)  # hold it long enough for the 1 ms sampler to see it
            total = int(pages[:: 4096].sum())
            del pages
        return total

    small = eff.peak_memory(lambda: torch.ones(16).sum(), "cpu", cpu_method=method)
    big = eff.peak_memory(allocate_big, "cpu", cpu_method=method)
    assert small.peak_bytes > 0 and small.device == "cpu"
    assert big.method == {"hwm": "rss_high_water_mark", "sampling": "rss_sampling"}[method]
    assert big.delta_bytes >= 0.9 * size
    assert small.delta_bytes < 0.5 * size
    assert big.as_dict()["peak_mb"] == pytest.approx(big.peak_bytes / 2**20)


def test_peak_memory_refuses_unknown_device_and_method():
    with pytest.raises(ValueError, match="'meta'"):
        eff.peak_memory(lambda: None, "meta")
    with pytest.raises(ValueError, match="cpu_method"):
        eff.peak_memory(lambda: None, "cpu", cpu_method="rusage")


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_export_passes_parity_with_dynamic_batch(backend, tmp_path):
    model = _small_cnn()
    x = torch.randn(2, 1, 8, 8)
    exported, report = eff.export_with_parity(model, x, backend=backend, workdir=tmp_path)
    assert report.passed and report.max_rel_diff < 1e-4 and report.agreement == 1.0
    assert (report.atol, report.rtol) == (1e-5, 1e-3)  # the defaults for FP32 exports
    # Checked at the example batch and at twice that batch (dynamic axis).
    assert report.input_shapes == [[(2, 1, 8, 8)], [(4, 1, 8, 8)]]
    assert (tmp_path / "model.onnx").is_file()

    x5 = torch.randn(5, 1, 8, 8)
    for out in (exported(x5), exported(x5.numpy())):
        assert isinstance(out, np.ndarray) and out.shape == (5, 3)
        np.testing.assert_allclose(out, model(x5).detach().numpy(), atol=1e-4)
    assert eff.measure_latency(exported, x5, warmup=1, repeats=3).threads == exported.num_threads


def test_parity_fails_against_a_model_with_other_weights(tmp_path):
    exported, _ = eff.export_with_parity(_small_cnn(seed=0), torch.randn(2, 1, 8, 8), workdir=tmp_path)
    report = eff.check_parity(_small_cnn(seed=1), exported, torch.randn(16, 1, 8, 8))
    assert not report.passed and report.max_abs_diff > 1e-2


def test_export_with_parity_raises_when_exported_output_is_perturbed(tmp_path, monkeypatch):
    original_call = eff.OnnxRuntimeModel.__call__
    monkeypatch.setattr(eff.OnnxRuntimeModel, "__call__", lambda self, *a: original_call(self, *a) * 1.01)
    with pytest.raises(eff.ParityError, match=r"max_rel_diff=0\.01 .*rtol 0\.001"):
        eff.export_with_parity(_small_cnn(), torch.randn(2, 1, 8, 8), workdir=tmp_path)


def test_export_of_a_perturbed_copy_fails_parity(tmp_path, monkeypatch):
    """A 1% error in one weight of the exported copy is caught at the default tolerances."""
    export_onnx = eff.export_onnx

    def export_perturbed_copy(model, *args, **kwargs):
        model = copy.deepcopy(model)
        with torch.no_grad():
            model[0].weight.mul_(1.01)
        return export_onnx(model, *args, **kwargs)

    monkeypatch.setattr(eff, "export_onnx", export_perturbed_copy)
    for backend in eff.BACKENDS:
        with pytest.raises(eff.ParityError, match=f"{backend} export"):
            eff.export_with_parity(_small_cnn(), torch.randn(2, 1, 8, 8), backend=backend, workdir=tmp_path)


def test_parity_tolerance_is_relative_to_each_outputs_scale():
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    with torch.no_grad():
        model.cls.weight.mul_(1e4)  # class logits ~1e4, score logit ~1
    x = torch.randn(6, 10)
    scaled = lambda factor: lambda *a: tuple(o * factor for o in model(*a))  # noqa: E731
    # 5e-4 of each output's scale: differences of several units on the class logits are within rtol 1e-3
    report = eff.check_parity(model, scaled(1 + 5e-4), x)
    assert report.passed and report.max_abs_diff > 1 and report.max_rel_diff == pytest.approx(5e-4, rel=1e-3)
    assert not eff.check_parity(model, scaled(1 + 5e-4), x, rtol=0.0, atol=1e-3).passed  # absolute alone fails
    assert not eff.check_parity(model, scaled(1 + 2e-3), x).passed
    # each output is judged by its own scale: 5e-4 of the class logits' scale, added to the score (scale ~1), fails
    shift = 5e-4 * model(x)[0].abs().max().item()
    report = eff.check_parity(model, lambda *a: (model(*a)[0], model(*a)[1] + shift), x)
    assert not report.passed and report.max_abs_diff == pytest.approx(shift, rel=1e-4)


def test_parity_with_several_outputs_and_threshold_agreement(tmp_path):
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    x = torch.randn(6, 10)
    exported, report = eff.export_with_parity(model, x, workdir=tmp_path)
    assert report.passed and report.torch_output_shapes[0] == [(6, 3), (6, 1)]
    logits, score = exported(x)
    assert logits.shape == (6, 3) and score.shape == (6, 1)

    # Flipping the score's sign flips every thresholded (B, 1) prediction whose logit is not zero.
    flipped = lambda *a: (exported(*a)[0], -exported(*a)[1])  # noqa: E731
    report = eff.check_parity(model, flipped, x, atol=10.0)
    assert report.agreement == pytest.approx(6 / 12)  # 6 argmax predictions agree, 6 thresholded differ
    assert not report.passed


def test_export_refuses_unknown_backend_before_exporting(tmp_path):
    with pytest.raises(ValueError, match="unknown export backend 'tensorrt'.*onnxruntime, openvino"):
        eff.export_with_parity(_small_cnn(), torch.randn(1, 1, 8, 8), backend="tensorrt", workdir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_wrappers_refuse_missing_file_and_wrong_input_count(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        eff.OnnxRuntimeModel(tmp_path / "missing.onnx")
    path = eff.export_onnx(_small_cnn(), torch.randn(1, 1, 8, 8), tmp_path / "cnn.onnx")
    with pytest.raises(ValueError, match="expects 1 inputs, got 2"):
        eff.OnnxRuntimeModel(path)(np.zeros((1, 1, 8, 8), np.float32), np.zeros(1))


# --------------------------------------------------------------------------------------------- summary


def test_efficiency_summary_is_a_flat_record():
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))
    summary = eff.efficiency_summary(model, torch.randn(3, 10), deployed_modules=model[0], warmup=1, repeats=4)
    assert summary["params_total"] == 67 and summary["params_deployed"] == 55
    assert summary["flops"] == 2 * 3 * (10 * 5 + 5 * 2)
    assert summary["input_shape"] == "3x10" and summary["latency_n"] == 4
    assert summary["latency_ms_median"] <= summary["latency_ms_p90"]
    assert summary["threads"] == torch.get_num_threads() and summary["device"] == "cpu"
    assert all(isinstance(v, (int, float, str)) for v in summary.values())

"""What the CUDA tests share: their marks, and comparisons of a CUDA result with the CPU one.

Every test trains from one seed on both devices (CUDA with mixed precision where the code offers it) and compares.
Labels, shapes and dtypes must be identical; numbers must agree within a tolerance relative to their own size, wide
enough for bf16/fp16 training and other kernels (TF32 convolutions), far too narrow for garbage such as a half-copied
tensor. Accuracy and AUC of the tiny models that a few steps train stay near chance, where a small change of the
scores reorders them: there the tests compare the scores the metrics are computed from. Each
comparison prints what it saw, so a run's log shows the margins (``pytest -s``).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch

CUDA = pytest.mark.cuda
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on one)")
MARKS = [CUDA, NEEDS_CUDA]


def _array(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def assert_close(actual, expected, rel: float, what: str) -> None:
    """Same shape and max |actual - expected| <= rel * max |expected| (the values' scale)."""
    a, e = _array(actual), _array(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} on CUDA, {e.shape} on the CPU"
    scale = float(np.abs(e).max()) if e.size else 0.0
    diff = float(np.abs(a - e).max()) if e.size else 0.0
    print(f"{what}: max |cuda - cpu| = {diff:.3g} (scale {scale:.3g}, allowed {rel * scale:.3g})")
    assert np.isfinite(a).all(), f"{what}: non-finite values on CUDA"
    assert diff <= rel * scale, f"{what}: CUDA and CPU differ by {diff:.3g}, more than {rel} of {scale:.3g}"


def assert_scores_close(actual: Mapping[str, float], expected: Mapping[str, float], rel: float, floor: float,
                        what: str) -> None:
    """Scores in %: each within ``rel`` of the CPU's value plus ``floor`` points (e.g. one test item's worth, 100 / n,
    as a prediction at a near-tie may fall either way on another device)."""
    assert set(actual) == set(expected), f"{what}: scores {sorted(actual)} on CUDA, {sorted(expected)} on the CPU"
    for key, value in expected.items():
        allowed = rel * abs(value) + floor
        print(f"{what} {key}: cuda {actual[key]:.4g}, cpu {value:.4g} (allowed difference {allowed:.3g})")
        assert abs(actual[key] - value) <= allowed, f"{what} {key}: {actual[key]:.4g} on CUDA, {value:.4g} on the CPU"


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Identical values, shape and dtype, on the CPU."""
    assert actual.device.type == "cpu", f"{what}: returned on {actual.device}, not on the CPU"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
    assert torch.equal(actual, expected), f"{what}: values differ, e.g. {actual[actual != expected][:5].tolist()}"

"""What the CUDA tests share: their marks, and comparisons of a CUDA result with the CPU one.

Every test trains from one seed on both devices and compares, in two ways. In fp32 with TF32 off
(:func:`full_fp32`) the CUDA path must give the CPU's numbers within a tolerance relative to their size, or, where a
few training steps amplify rounding beyond it, within a few times how far a rounding-level nudge of the inputs moves
the CPU's own result: this is where a device-path bug (a half-copied tensor, a wrong dtype, a missed synchronisation)
shows. Under mixed precision,
as the gpu profile trains, labels, shapes and dtypes must still be identical and the numbers finite and of the CPU's
scale, but not equal: bf16 flips the sign of near-zero gradients, and Adam's first steps move such a weight by lr
either way, so a few steps leave tiny models tens of % apart (issue 15's first runs on an H200 measured up to 56 %).
Features are compared row by row by cosine there, which bf16 rounding leaves near 1 and garbage does not. Accuracy and
AUC of the tiny models that a few steps train stay near chance, where a small change of the scores reorders them:
there the tests compare the scores the metrics are computed from. Each comparison prints what it saw, so a run's log
shows the margins (``pytest -s``).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import pytest
import torch

CUDA = pytest.mark.cuda
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on one)")
MARKS = [CUDA, NEEDS_CUDA]
# A few Adam steps from random weights amplify rounding: on the CPU alone, training images nudged by 1e-6 of their
# value move some of RD's test logits by 16-23 % of their scale (mobilenetv3 students, measured 2026-12-03). CUDA may
# differ from the CPU by a few times that much; a device-path bug (a half-copied tensor, a wrong dtype) by more.
NOISE_FACTOR = 3.0
NUDGE = 1e-6


def _array(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


@contextmanager
def full_fp32() -> Iterator[None]:
    """CUDA matmuls and convolutions in full fp32 (no TF32) inside the block, as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_close(actual, expected, rel: float, what: str, noise: float = 0.0) -> None:
    """Same shape and max |actual - expected| <= rel * max |expected| (the values' scale), or within
    :data:`NOISE_FACTOR` times ``noise``: how far a rounding-level nudge moves the CPU's own result
    (:func:`max_difference`), where training amplifies rounding beyond ``rel``."""
    a, e = _array(actual), _array(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} on CUDA, {e.shape} on the CPU"
    scale = float(np.abs(e).max()) if e.size else 0.0
    diff = float(np.abs(a - e).max()) if e.size else 0.0
    allowed = max(rel * scale, NOISE_FACTOR * noise)
    print(f"{what}: max |cuda - cpu| = {diff:.3g} (scale {scale:.3g}, CPU noise {noise:.3g}, allowed {allowed:.3g})")
    assert np.isfinite(a).all(), f"{what}: non-finite values on CUDA"
    assert diff <= allowed, (f"{what}: CUDA and CPU differ by {diff:.3g}, more than {rel} of {scale:.3g} and "
                             f"{NOISE_FACTOR} x the CPU's own noise {noise:.3g}")


def max_difference(a, b) -> float:
    """max |a - b| of two results of one computation: with ``b`` from inputs nudged by a rounding error, the
    CPU's own sensitivity to rounding, the noise :func:`assert_close` allows for."""
    return float(np.abs(_array(a) - _array(b)).max())


def assert_rows_aligned(actual, expected, min_cosine: float, what: str) -> None:
    """Same shape, finite, and every row's cosine similarity with the CPU's row at least ``min_cosine``."""
    a, e = torch.as_tensor(_array(actual)), torch.as_tensor(_array(expected))
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} on CUDA, {tuple(e.shape)} on the CPU"
    assert torch.isfinite(a).all(), f"{what}: non-finite values on CUDA"
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), e.flatten(1), dim=1)
    print(f"{what}: row cosine with the CPU's min {float(cosine.min()):.5f} (allowed {min_cosine})")
    assert float(cosine.min()) >= min_cosine, f"{what}: a row's cosine with the CPU's is {float(cosine.min()):.4f}"


def assert_same_scale(actual, expected, what: str, factor: float = 4.0) -> None:
    """Same shape, finite, and a largest magnitude within ``factor`` of the CPU's either way: what mixed-precision
    training of a few steps leaves comparable."""
    a, e = _array(actual), _array(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} on CUDA, {e.shape} on the CPU"
    assert np.isfinite(a).all(), f"{what}: non-finite values on CUDA"
    big_a, big_e = float(np.abs(a).max()), float(np.abs(e).max())
    print(f"{what}: largest magnitude {big_a:.3g} on CUDA, {big_e:.3g} on the CPU")
    assert big_e / factor <= big_a <= big_e * factor, f"{what}: scale {big_a:.3g} on CUDA, {big_e:.3g} on the CPU"


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

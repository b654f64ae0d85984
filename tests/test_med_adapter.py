"""Med-Adapter: shapes, parameter counts by hand, each ablation switch, the slice-axis FFT filter, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from mdbench.models.med_adapter import MedAdapter

B, T, H, W, C, R = 2, 5, 3, 4, 24, 6  # bottleneck width int(24 / 6) = 4


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def by_hand(dim: int, t: int, ratio: float, branch3=True, branch5=True, fft=True, inter=False, prev=None, stride=1):
    """The layer arithmetic of the spec (section 4.2), written out independently of the module."""
    h = int(dim / ratio)
    p = h if prev is None else prev
    total = (dim * h + h) + (h * h + h) + (h * dim + dim)  # down, 1x1x1 fusion, up
    total += branch3 * ((9 * h + h) + (3 * h + h) + 2 * h)  # DW 1x3x3, DW 3x1x1, BN
    total += branch5 * ((25 * h + h) + (5 * h + h) + 2 * h)  # DW 1x5x5, DW 5x1x1, BN
    total += fft * 2 * t  # W_f and B_f, one per slice frequency
    if inter:
        total += (p * h if stride == 1 else 9 * p * h) + h + (2 * h * h + h)  # psi, then the 2C'->C' interaction
    return total


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(B * T, H * W, C, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_state_passing():
    x = tokens()
    plain = MedAdapter(C, T, R)
    state = torch.randn(B, 4, T, H, W)
    y, passed = plain(x, (H, W), state)
    assert y.shape == x.shape and passed is state  # a non-inter adapter hands the state on untouched
    inter = MedAdapter(C, T, R, inter_stage=True)
    y, new = inter(x, (H, W), None)
    assert y.shape == x.shape and new.shape == (B, 4, T, H, W)
    finer = MedAdapter(C, T, R, inter_stage=True, prev_hidden=2, prev_stride=2)
    y, new = finer(x, (H, W), torch.randn(B, 2, T, 2 * H, 2 * W))
    assert new.shape == (B, 4, T, H, W)


@pytest.mark.parametrize("switches", [
    {}, {"branch3": False}, {"branch5": False}, {"fft": False}, {"branch3": False, "branch5": False},
    {"inter": True}, {"inter": True, "prev": 2, "stride": 2}, {"inter": True, "fft": False},
])
def test_parameter_count_by_hand(switches):
    kwargs = {"branch3": switches.get("branch3", True), "branch5": switches.get("branch5", True),
              "fft": switches.get("fft", True), "inter_stage": switches.get("inter", False),
              "prev_hidden": switches.get("prev"), "prev_stride": switches.get("stride", 1)}
    assert n_params(MedAdapter(C, T, R, **kwargs)) == by_hand(C, T, R, kwargs["branch3"], kwargs["branch5"],
                                                              kwargs["fft"], kwargs["inter_stage"],
                                                              kwargs["prev_hidden"], kwargs["prev_stride"])


def test_each_switch_removes_its_own_parameters():
    full = n_params(MedAdapter(C, T, R))
    h = 4
    assert full - n_params(MedAdapter(C, T, R, branch3=False)) == 16 * h
    assert full - n_params(MedAdapter(C, T, R, branch5=False)) == 34 * h
    assert full - n_params(MedAdapter(C, T, R, fft=False)) == 2 * T
    assert n_params(MedAdapter(C, T, R, inter_stage=True)) - full == (h * h + h) + (2 * h * h + h)


def test_vit_b_counts_match_the_spec():
    """Spec 4.2 (official code, ViT-B/16, T = 128): 220,672 per adapter, 49,408 per inter-stage extra, ~2.85 M."""
    one = n_params(MedAdapter(768, 128, 6))
    inter = n_params(MedAdapter(768, 128, 6, inter_stage=True))
    assert one == 220_672 and inter - one == 49_408
    assert round((12 * one + 4 * (inter - one)) / 1e6, 2) == 2.85


def test_fft_filter_at_init_adds_a_delta():
    """W_f = B_f = 1: IFFT(FFT(V)·1 + 1) = V + IFFT(1) = V + δ at (t, h, w) = (0, 0, 0), so Fg = |V + δ|."""
    adapter = MedAdapter(C, T, R, branch3=False, branch5=False)
    v = torch.randn(B, 4, T, H, W)
    delta = torch.zeros_like(v)
    delta[:, :, 0, 0, 0] = 1
    torch.testing.assert_close(adapter.fft(v), (v + delta).abs(), atol=1e-5, rtol=1e-5)
    assert adapter.fft.weight.shape == (1, 1, T, 1, 1) and adapter.fft.bias.shape == (1, 1, T, 1, 1)


def test_fft_filter_acts_on_the_slice_axis():
    """A cosine along T at frequency k is removed by W_f[k] = W_f[T-k] = 0 and kept at every other frequency."""
    adapter = MedAdapter(C, 8, R, branch3=False, branch5=False)
    t = torch.arange(8, dtype=torch.float32)
    k = 2
    wave = torch.cos(2 * math.pi * k * t / 8).view(1, 1, 8, 1, 1).expand(1, 4, 8, H, W)
    with torch.no_grad():
        adapter.fft.bias.zero_()
        torch.testing.assert_close(adapter.fft(wave), wave.abs(), atol=1e-5, rtol=0)  # all-pass
        adapter.fft.weight[0, 0, [k, 8 - k]] = 0
        assert adapter.fft(wave).abs().max() < 1e-5
        adapter.fft.weight.fill_(1)
        adapter.fft.weight[0, 0, [1, 7]] = 0  # another frequency: the wave passes
        torch.testing.assert_close(adapter.fft(wave), wave.abs(), atol=1e-5, rtol=0)


def test_receptive_field_across_slices():
    """The 3x3 branch alone mixes only neighbouring slices; the FFT branch reaches every slice."""
    x = tokens()
    x2 = x.clone()
    x2[0] += 1.0  # slice 0 of volume 0
    local = MedAdapter(C, T, R, branch5=False, fft=False).eval()
    global_ = MedAdapter(C, T, R, branch3=False, branch5=False).eval()
    with torch.no_grad():
        d_local = (local(x2, (H, W))[0] - local(x, (H, W))[0]).abs().amax(dim=(1, 2))
        d_global = (global_(x2, (H, W))[0] - global_(x, (H, W))[0]).abs().amax(dim=(1, 2))
    assert d_local[1] > 0 and d_local[2:T].max() == 0 and d_local[T:].max() == 0  # neighbour only, same volume
    assert (d_global[1:T] > 0).all() and d_global[T:].max() == 0


def test_gradients_reach_every_parameter_and_the_input():
    adapter = MedAdapter(C, T, R, inter_stage=True)
    x = tokens().requires_grad_(True)
    y, state = adapter(x, (H, W), torch.randn(B, 4, T, H, W))
    (y.square().mean() + state.square().mean()).backward()
    missing = [n for n, p in adapter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and x.grad.abs().sum() > 0


def test_bad_input_is_refused():
    adapter = MedAdapter(C, T, R)
    with pytest.raises(ValueError, match="expected"):
        adapter(tokens(), (H, W + 1))
    with pytest.raises(ValueError, match="expected"):
        adapter(torch.randn(B * T + 1, H * W, C), (H, W))
    with pytest.raises(ValueError, match="at least one intra-stage branch"):
        MedAdapter(C, T, R, branch3=False, branch5=False, fft=False)
    with pytest.raises(ValueError, match="int\\(dim / ratio\\)"):
        MedAdapter(4, T, 6)
    with pytest.raises(ValueError, match="prev_stride"):
        MedAdapter(C, T, R, inter_stage=True, prev_stride=4)


def test_initialised_as_the_official_code():
    """The official ``MedAdapter`` keeps PyTorch's default initialisation for every layer (no zero-init, no init
    function over the model) and sets W_f = B_f = 1. Built under one seed in the official order (down-projection,
    the 3x3 and 5x5 branches, the 1x1x1 conv, up-projection), plain torch layers give our adapter's weights."""
    torch.manual_seed(3)
    ours = MedAdapter(C, T, R)
    torch.manual_seed(3)
    h = int(C / R)
    official = [torch.nn.Linear(C, h),
                torch.nn.Conv3d(h, h, (1, 3, 3), padding=(0, 1, 1), groups=h),
                torch.nn.Conv3d(h, h, (3, 1, 1), padding=(1, 0, 0), groups=h), torch.nn.BatchNorm3d(h),
                torch.nn.Conv3d(h, h, (1, 5, 5), padding=(0, 2, 2), groups=h),
                torch.nn.Conv3d(h, h, (5, 1, 1), padding=(2, 0, 0), groups=h), torch.nn.BatchNorm3d(h),
                torch.nn.Conv3d(h, h, 1), torch.nn.Linear(h, C)]
    mine = [ours.down, *list(ours.branch3)[:3], *list(ours.branch5)[:3], ours.fuse, ours.up]
    for theirs, layer in zip(official, mine, strict=True):
        for (name, a), (_, b) in zip(theirs.named_parameters(), layer.named_parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{type(layer).__name__}.{name}")
    assert torch.equal(ours.fft.weight, torch.ones(1, 1, T, 1, 1)) and torch.equal(ours.fft.bias, torch.ones(1, 1, T, 1, 1))
    assert ours.up.weight.abs().min() > 0  # not zero-initialised: the adapter moves the frozen network from step 0

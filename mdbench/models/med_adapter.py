"""Med-Adapter (Med-Tuning, Shen et al., MIDL 2024; official code ``models/model_base/insert_blocks.py``).

A trainable bottleneck inserted after a frozen transformer block of a 2D backbone that runs on all T slices of a
volume at once. It sees the slices as a 3D grid, so it can mix information across the slice axis, which the 2D
backbone cannot. With input tokens ``X`` of shape (B·T, L, C) on an (h, w) grid and ``C' = int(C / r)``:

1. ``X_d = GELU(X W_d + b_d)``, reshaped to ``V`` (B, C', T, h, w) (channels first, depth = slice axis);
2. intra-stage enhancement, all convolutions depthwise with "same" padding:
   ``F3 = ReLU(BN(DW_3x1x1(DW_1x3x3(V))))``, ``F5 = ReLU(BN(DW_5x1x1(DW_1x5x5(V))))`` and
   ``Fg = |IFFT3(FFT3(V) ⊙ W_f + B_f)|`` with ``W_f, B_f`` of shape (1, 1, T, 1, 1) initialised to ones: one learnable
   weight per slice frequency, shared over channels and in-plane frequencies (as the official code);
   ``F = Conv_1x1x1(F3 + F5 + Fg)``;
3. inter-stage interaction (only in "inter-stage" adapters): ``A = Conv_1x1x1(concat[F, ψ(A_prev)])`` (2C' -> C'),
   ψ a 1x1x1 conv when the previous state lies on the same grid, a (1,3,3) conv of stride (1,2,2) when the grid
   halves; ``A`` becomes the carried state. Other adapters use ``A = F`` and pass the state through;
4. ``V' = V + A``; ``Y = X + GELU(V' W_u + b_u)`` (up-projection, not zero-initialised).

Initialisation as in the official code (which applies no init function to its adapters): PyTorch's defaults for
every linear and convolution layer (Kaiming-uniform weights, uniform biases), BatchNorm weight 1 and bias 0, and
``W_f = B_f = 1``; nothing is zero-initialised, so the adapters change the frozen network's output from the first
step.

Each intra branch (``branch3``, ``branch5``, ``fft``) and the interaction (``inter_stage``) can be switched off for
the ablation; a switched-off branch has no parameters. Built by ``build_model("med_adapter", dim=..., num_slices=...)``
or by :class:`mdbench.models.slicewise.SliceWiseSegmenter` after every transformer block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdbench.models.registry import RANDOM_INIT, register_model

__all__ = ["MedAdapter"]


def _depthwise(channels: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    """Depthwise 3D conv with "same" padding (odd kernels)."""
    depth, height, width = kernel
    return nn.Conv3d(channels, channels, kernel, padding=(depth // 2, height // 2, width // 2), groups=channels)


class _SeparableBranch(nn.Sequential):
    """``ReLU(BN(DW_kx1x1(DW_1xkxk(V))))``: in-slice k×k, then across-slice k, on (B, C', T, h, w)."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__(_depthwise(channels, (1, k, k)), _depthwise(channels, (k, 1, 1)),
                         nn.BatchNorm3d(channels), nn.ReLU())


class _SliceFrequencyFilter(nn.Module):
    """``|IFFT3(FFT3(V) ⊙ W_f + B_f)|`` over (T, h, w) with W_f, B_f (1, 1, T, 1, 1), both initialised to ones."""

    def __init__(self, num_slices: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 1, num_slices, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, 1, num_slices, 1, 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        # FFTs run in float32: cuFFT refuses half precision for sizes that are not powers of two
        spectrum = torch.fft.fftn(v.float(), dim=(2, 3, 4))
        return torch.fft.ifftn(spectrum * self.weight + self.bias, dim=(2, 3, 4)).abs().to(v.dtype)


@register_model("med_adapter", pretrained_weights=False)
class MedAdapter(nn.Module):
    """One Med-Adapter (see the module docstring for the computation).

    Args:
        dim: token width C of the block it follows.
        num_slices: T, the number of slices per volume (the FFT filter has one weight per slice frequency).
        ratio: reduction ratio r; the bottleneck width is ``int(dim / ratio)`` as in the official code.
        branch3, branch5, fft: switch the 3×3 / 5×5 separable branches and the FFT branch on or off.
        inter_stage: whether this adapter does the inter-stage interaction (last block of a stage).
        prev_hidden: bottleneck width of the carried state it receives (default: its own, as in a plain ViT).
        prev_stride: 1 when the carried state is on this adapter's (h, w) grid, 2 when on a grid twice as fine.

    Shapes: ``forward(x, hw, state)`` with ``x`` (B·T, L = h·w, C) and ``state`` None or (B, prev_hidden, T,
    h·prev_stride, w·prev_stride) returns ``(y, new_state)`` with ``y`` (B·T, L, C) and ``new_state``
    (B, C', T, h, w)    for inter-stage adapters, else ``state`` unchanged.
    """

    def __init__(self, dim: int, num_slices: int, ratio: float = 6, *, branch3: bool = True, branch5: bool = True,
                 fft: bool = True, inter_stage: bool = False, prev_hidden: int | None = None,
                 prev_stride: int = 1) -> None:
        super().__init__()
        hidden = int(dim / ratio)
        if hidden < 1 or num_slices < 1:
            raise ValueError(f"MedAdapter needs int(dim / ratio) >= 1 and num_slices >= 1; got dim={dim}, "
                             f"ratio={ratio}, num_slices={num_slices}")
        if not (branch3 or branch5 or fft):
            raise ValueError("MedAdapter needs at least one intra-stage branch (branch3, branch5 or fft) switched on")
        if prev_stride not in (1, 2):
            raise ValueError(f"prev_stride must be 1 (same grid) or 2 (grid halves), got {prev_stride}")
        self.dim, self.hidden, self.num_slices = dim, hidden, num_slices
        self.inter_stage, self.prev_stride = inter_stage, prev_stride
        self.prev_hidden = hidden if prev_hidden is None else prev_hidden
        self.down = nn.Linear(dim, hidden)
        self.branch3 = _SeparableBranch(hidden, 3) if branch3 else None
        self.branch5 = _SeparableBranch(hidden, 5) if branch5 else None
        self.fft = _SliceFrequencyFilter(num_slices) if fft else None
        self.fuse = nn.Conv3d(hidden, hidden, 1)
        if inter_stage:
            if prev_stride == 1:
                self.psi = nn.Conv3d(self.prev_hidden, hidden, 1)
            else:
                self.psi = nn.Conv3d(self.prev_hidden, hidden, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
            self.interact = nn.Conv3d(2 * hidden, hidden, 1)
        self.up = nn.Linear(hidden, dim)
        self.mdbench_init = RANDOM_INIT

    def initial_state(self, batch: int, hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The zero state an inter-stage adapter receives when no earlier stage has produced one."""
        h, w = hw
        s = self.prev_stride
        return like.new_zeros(batch, self.prev_hidden, self.num_slices, h * s, w * s)

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        bt, length, channels = x.shape
        h, w = hw
        t = self.num_slices
        if channels != self.dim or length != h * w or bt % t:
            raise ValueError(f"MedAdapter(dim={self.dim}, num_slices={t}) got tokens {tuple(x.shape)} on grid {hw}: "
                             f"expected (B·{t}, {h}·{w}, {self.dim})")
        batch = bt // t
        v = F.gelu(self.down(x)).reshape(batch, t, h, w, self.hidden).permute(0, 4, 1, 2, 3)
        enhanced = sum(branch(v) for branch in (self.branch3, self.branch5, self.fft) if branch is not None)
        a = self.fuse(enhanced)
        if self.inter_stage:
            prev = self.initial_state(batch, hw, v) if state is None else state
            a = self.interact(torch.cat([a, self.psi(prev)], dim=1))
            state = a
        v = (v + a).permute(0, 2, 3, 4, 1).reshape(bt, length, self.hidden)
        return x + F.gelu(self.up(v)), state


"""EFCM's TransScan student (Li & Diao, arXiv 2409.11817): a small timm CNN, a TransScan block, a projector.

The student encodes one patch into a feature vector that replaces the large teacher's feature for a MIL head:

    patch (B, 3, h, w) --timm CNN, truncated--> map (B, C, h/s, w/s) --TransScan--> map --mean--> f_S (B, C)
                       --projection head P--> (B, D_T), in the teacher's feature space

**TransScan** (transformer + Selective Convolutional Attention Network) as our spec reads it: a pre-norm
transformer block over the map's tokens whose token mixing is followed by a selective-kernel ("SCAN") branch,

    t = t + MHSA(LN(t));   g = g + SK(g);   t = t + MLP(LN(t))

where SK runs K depthwise 3x3 convolutions of dilation 1, 2, 3 (receptive fields 3, 5, 7) in parallel, pools their
sum globally, and mixes them with a per-channel softmax over the K branches (SKNet; timm's ``SelectiveKernel``), so
each channel picks its receptive field from the input. **Projection head**: Linear-GELU-Linear (FPD) or one Linear
layer (plain feature KD, a FitNet-style regressor).

Variants (:data:`STUDENT_VARIANTS`, EFCM's ablation): ``fpd_ts`` (TransScan + MLP projector, the EFCM student),
``fpd`` (MLP projector, no TransScan), ``kd`` (linear regressor, no TransScan; trained with plain MSE). Built by
``build_model("transscan_student", variant=..., teacher_dim=...)`` or :func:`build_transscan_student`.
"""
from __future__ import annotations

from typing import TypedDict

import torch
from timm.layers import Attention, Mlp, SelectiveKernel
from timm.models import FeatureListNet
from torch import nn

from mdbench.models.registry import build_model, register_model

__all__ = ["STUDENT_VARIANTS", "StudentVariant", "TransScan", "TransScanStudent", "build_transscan_student"]


class TransScan(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): pre-norm MHSA over the H*W tokens, a selective-kernel branch, an MLP.

    Args:
        dim: C channels (divisible by ``num_heads``).
        num_heads: attention heads.
        kernel_sizes: receptive fields of the SK branches; timm's ``keep_3x3`` turns each into a 3x3 depthwise
            convolution of dilation ``(k - 1) // 2``.
        mlp_ratio: hidden width of the MLP over ``dim``.
        sk_reduction: width of SK's squeeze layer over ``dim``.
    """

    def __init__(self, dim: int, num_heads: int = 4, kernel_sizes: tuple[int, ...] = (3, 5, 7),
                 mlp_ratio: float = 2.0, sk_reduction: float = 0.25) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TransScan: dim {dim} is not divisible by num_heads {num_heads}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.scan = SelectiveKernel(dim, kernel_size=list(kernel_sizes), groups=dim, split_input=False,
                                    keep_3x3=True, rd_ratio=sk_reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = tokens + self.attn(self.norm1(tokens))
        grid = tokens.transpose(1, 2).reshape(b, c, h, w)
        grid = grid + self.scan(grid)
        tokens = grid.flatten(2).transpose(1, 2)
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class TransScanStudent(nn.Module):
    """Patch encoder: truncated timm CNN, optional TransScan, mean pooling, optional projection head.

    Args:
        teacher_dim: D_T, width of the teacher features the projection head maps into.
        backbone: timm model name, built through :func:`mdbench.models.build_model` (no download).
        out_index: the backbone stage whose map is used (``features_only`` index; 2 = stride 8 for ResNets).
        transscan: add a :class:`TransScan` block on that map.
        projector: ``"mlp"`` (Linear-GELU-Linear, FPD), ``"linear"`` (plain KD regressor) or None (pooled
            student features are the output).
        proj_hidden: hidden width of the MLP projector.
        num_heads: TransScan attention heads.
        pretrained: load local ImageNet weights for the backbone where they exist (random init otherwise).

    Input (B, 3, h, w) patches in [0, 1]; ``forward`` returns (B, out_dim): D_T with a projector, else C.
    ``embed`` returns the pooled (B, C) features before the projector.
    """

    def __init__(self, teacher_dim: int, backbone: str = "resnet10t", out_index: int = 2, transscan: bool = True,
                 projector: str | None = "mlp", proj_hidden: int = 512, num_heads: int = 4,
                 pretrained: bool = False) -> None:
        super().__init__()
        if projector not in ("mlp", "linear", None):
            raise ValueError(f"projector must be 'mlp', 'linear' or None, got {projector!r}")
        full = build_model(f"timm:{backbone}", pretrained=pretrained)
        # timm's own feature wrapper keeps the stages up to out_index and drops the rest (head included)
        self.backbone = FeatureListNet(full, out_indices=(out_index,))
        self.mdbench_init = full.mdbench_init
        self.feature_dim = int(self.backbone.feature_info.channels()[-1])
        self.transscan = TransScan(self.feature_dim, num_heads) if transscan else None
        self.projector: nn.Sequential | nn.Linear | None
        if projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(self.feature_dim, proj_hidden), nn.GELU(),
                                           nn.Linear(proj_hidden, teacher_dim))
        elif projector == "linear":
            self.projector = nn.Linear(self.feature_dim, teacher_dim)
        else:
            self.projector = None
        self.out_dim = teacher_dim if projector else self.feature_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, C) pooled student features."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the student takes (B, 3, h, w) patches, got {tuple(x.shape)}")
        fmap = self.backbone(x)[-1]
        if self.transscan is not None:
            fmap = self.transscan(fmap)
        return fmap.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, out_dim): projected features (teacher space) or pooled features."""
        f = self.embed(x)
        return self.projector(f) if self.projector is not None else f


class StudentVariant(TypedDict):
    """The :class:`TransScanStudent` arguments that make one variant."""

    transscan: bool
    projector: str | None


STUDENT_VARIANTS: dict[str, StudentVariant] = {
    "fpd_ts": {"transscan": True, "projector": "mlp"},
    "fpd": {"transscan": False, "projector": "mlp"},
    "kd": {"transscan": False, "projector": "linear"},
}


@register_model("transscan_student")
def build_transscan_student(variant: str = "fpd_ts", teacher_dim: int = 256, pretrained: bool = False,
                            **kwargs) -> TransScanStudent:
    """A student variant of :data:`STUDENT_VARIANTS` (``fpd_ts``, ``fpd``, ``kd``).

    Args:
        variant: which parts the student has (see the module docstring).
        teacher_dim: D_T, the width its projector maps into.
        pretrained: local ImageNet weights for the timm backbone where a file exists (EFCM trains from random init).
        **kwargs: :class:`TransScanStudent` arguments (``backbone``, ``out_index``, ``proj_hidden``, ``num_heads``).

    Returns:
        The student: (B, 3, h, w) patches -> (B, teacher_dim).
    """
    if variant not in STUDENT_VARIANTS:
        raise ValueError(f"unknown student variant {variant!r}; choose one of {', '.join(STUDENT_VARIANTS)}")
    return TransScanStudent(teacher_dim, **STUDENT_VARIANTS[variant], pretrained=pretrained, **kwargs)

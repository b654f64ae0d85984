"""EfficientViT-SAM, DAFT's student: an EfficientViT image encoder with EfficientViT-SAM's neck, merged into LiteMedSAM.

DAFT (Pfefferle, Purucker & Hutter, CVPR 2024 MedSAM-on-Laptop) distils LiteMedSAM's TinyViT encoder into the
image encoder of EfficientViT-SAM-L0 and reuses LiteMedSAM's prompt encoder and mask decoder (``modelmerge.py``).

- Backbone: a timm EfficientViT (MIT-Han-Lab) in ``features_only`` mode, stages 2-4 (strides 8, 16, 32). timm 1.0.31
  has ``efficientvit_b0..b3`` (widths 16..512) and ``efficientvit_l1..l3`` (widths 128/256/512 at those strides),
  plus the unrelated Microsoft ``efficientvit_m*`` (strides 16-64, not usable here). EfficientViT-SAM-L0's backbone
  is ``efficientvit_l1`` with depths (1, 1, 1, 4, 4) instead of (1, 1, 1, 6, 6): :data:`L0_DEPTHS`.
- Neck (EfficientViT-SAM's ``SamNeck``): each stage map -> 1x1 conv + BN to ``width`` channels -> resized to the
  fixed 64x64 grid -> summed -> ``depth`` residual (Fused)MBConv blocks -> 1x1 conv to 256 -> LayerNorm2d.
  A (B, 3, 256, 256) input gives the (B, 256, 64, 64) embedding of LiteMedSAM's encoder, so the mask decoder
  takes it unchanged. Upsampling is bilinear (EfficientViT-SAM uses bicubic) to keep exports simple.

Built by ``build_model("efficientvit_sam", backbone=..., neck_depth=...)`` or :func:`build_efficientvit_sam`.
"""
from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import GELU, LayerNorm2d
from timm.models.efficientvit_mit import (
    ConvNormAct,
    EfficientVit,
    EfficientVitLarge,
    FusedMBConv,
    MBConv,
    ResidualBlock,
)
from torch import nn

from mdbench.data.boxprompt import IMAGE_SIZE

from .litemedsam import EMBEDDING_SHAPE, LiteMedSAM, build_litemedsam
from .registry import register_model
from .timm_backbones import build_timm

__all__ = ["L0_DEPTHS", "EfficientViTSAMEncoder", "SamNeck", "build_efficientvit_sam", "efficientvit_sam_from_config"]

L0_DEPTHS = (1, 1, 1, 4, 4)  # EfficientViT-SAM-L0's backbone: efficientvit_l1 with shallower stages 3 and 4
_OUT_INDICES = (1, 2, 3)  # timm feature indices of strides 8, 16, 32 (EfficientViT-SAM's stage2..stage4)


class SamNeck(nn.Module):
    """Fuse multi-scale maps onto a fixed grid (EfficientViT-SAM's ``SamNeck``).

    Args:
        in_channels: channels of each input map (any spatial sizes).
        width: channels inside the neck (``head_width``, 256 in EfficientViT-SAM).
        depth: residual blocks after the fusion (4 in EfficientViT-SAM-L0).
        block: ``"fmbconv"`` (Fused-MBConv, full 3x3 conv, as L0) or ``"mbconv"`` (depthwise 3x3, much cheaper).
        out_channels, grid: output (B, out_channels, grid, grid).
    """

    def __init__(self, in_channels: tuple[int, ...], width: int = 256, depth: int = 4, block: str = "fmbconv",
                 out_channels: int = EMBEDDING_SHAPE[0], grid: int = EMBEDDING_SHAPE[1]) -> None:
        super().__init__()
        if block not in ("fmbconv", "mbconv"):
            raise ValueError(f"neck block must be 'fmbconv' or 'mbconv', got {block!r}")
        if depth < 0 or width < 1:
            raise ValueError(f"neck depth must be >= 0 and width >= 1, got depth={depth}, width={width}")
        self.grid = grid
        self.inputs = nn.ModuleList(ConvNormAct(c, width, 1, act_layer=None) for c in in_channels)
        # expand ratio 1 as in EfficientViT-SAM; the last conv of each block has no activation (linear bottleneck)
        make = (lambda: FusedMBConv(width, width, expand_ratio=1, act_layer=(GELU, None))) if block == "fmbconv" \
            else (lambda: MBConv(width, width, expand_ratio=1, act_layer=(GELU, GELU, None)))
        self.blocks = nn.Sequential(*(ResidualBlock(make(), nn.Identity()) for _ in range(depth)))
        self.out = nn.Conv2d(width, out_channels, 1)
        self.norm = LayerNorm2d(out_channels)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """List of (B, C_i, H_i, W_i) maps -> (B, out_channels, grid, grid)."""
        if len(maps) != len(self.inputs):
            raise ValueError(f"SamNeck expects {len(self.inputs)} maps, got {len(maps)}")
        size = (self.grid, self.grid)
        fused = sum(F.interpolate(proj(m), size=size, mode="bilinear", align_corners=False)
                    for proj, m in zip(self.inputs, maps, strict=True))
        return self.norm(self.out(self.blocks(fused)))


class EfficientViTSAMEncoder(nn.Module):
    """EfficientViT backbone + :class:`SamNeck`: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64).

    Takes LiteMedSAM's preprocessed input (min-max [0, 1], no mean/std), so it drops into ``LiteMedSAM`` in place
    of the TinyViT encoder. ``config`` holds the constructor arguments (saved with checkpoints).
    """

    input_size = IMAGE_SIZE

    def __init__(self, backbone: str = "efficientvit_l1", depths: tuple[int, ...] | None = L0_DEPTHS,
                 neck_width: int = 256, neck_depth: int = 4, neck_block: str = "fmbconv",
                 pretrained: bool = False) -> None:
        super().__init__()
        if not backbone.startswith(("efficientvit_b", "efficientvit_l")):
            raise ValueError(
                f"backbone must be a timm efficientvit_b* or efficientvit_l* model (strides 8/16/32), got {backbone!r}"
            )
        self.config = {"backbone": backbone, "depths": list(depths) if depths else None, "neck_width": neck_width,
                       "neck_depth": neck_depth, "neck_block": neck_block}
        extra = {"depths": tuple(depths)} if depths else {}
        body = build_timm(backbone, pretrained=pretrained, num_classes=0, **extra)
        assert isinstance(body, EfficientVit | EfficientVitLarge)  # what timm builds for the names checked above
        self.backbone = body
        self.backbone.prune_intermediate_layers(list(_OUT_INDICES), prune_head=True)  # drop the classifier head
        self.mdbench_init = self.backbone.mdbench_init
        # timm types feature_info as dicts of objects; num_chs is a stage's channel count
        channels = tuple(cast(int, self.backbone.feature_info[i]["num_chs"]) for i in _OUT_INDICES)
        self.neck = SamNeck(channels, neck_width, neck_depth, neck_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, 256, 64, 64)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the student encoder takes (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) input, got {tuple(x.shape)}")
        maps = self.backbone.forward_intermediates(x, indices=list(_OUT_INDICES), intermediates_only=True)
        return self.neck(maps)


@register_model("efficientvit_sam")
def build_efficientvit_sam(teacher: LiteMedSAM | None = None, pretrained: bool = False,
                           **encoder_kwargs) -> LiteMedSAM:
    """The merged model of DAFT's ``modelmerge.py``: an EfficientViT-SAM encoder + copies of the teacher's prompt
    encoder and mask decoder.

    Args:
        teacher: the LiteMedSAM whose prompt encoder and mask decoder are copied (default: the pretrained one).
        pretrained: ImageNet weights for the encoder's timm backbone where a local file exists (never downloaded);
            the prompt encoder and mask decoder always come from ``teacher``.
        **encoder_kwargs: :class:`EfficientViTSAMEncoder` arguments (``backbone``, ``depths``, ``neck_depth``, ...).

    Returns:
        ``LiteMedSAM(EfficientViTSAMEncoder(...), prompt_encoder, mask_decoder)`` in eval mode, with
        ``mdbench_init`` describing both parts: (B, 3, 256, 256) images and (B, 4) boxes -> (B, 1, 256, 256)
        low-res logits and (B, 1) IoU.
    """
    teacher = teacher if teacher is not None else build_litemedsam(pretrained=True)
    encoder = EfficientViTSAMEncoder(pretrained=pretrained, **encoder_kwargs)
    model = LiteMedSAM(encoder, copy.deepcopy(teacher.prompt_encoder), copy.deepcopy(teacher.mask_decoder))
    model.mdbench_init = f"encoder {encoder.mdbench_init}; prompt encoder + decoder {teacher.mdbench_init}"
    return model.eval()


def efficientvit_sam_from_config(config: dict, state_dict: dict[str, torch.Tensor] | None = None) -> LiteMedSAM:
    """Rebuild a model saved as ``(encoder.config, state_dict)`` (random decoder init, then the state dict)."""
    teacher = build_litemedsam(pretrained=False)
    model = build_efficientvit_sam(teacher, **config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()

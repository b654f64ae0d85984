"""A 3D U-Net trained from scratch (MONAI's residual ``UNet``): Med-Tuning's reference for what a network that sees
the whole volume reaches without a pretrained backbone.

``build_model("unet3d", in_channels=1, out_channels=3, channels=(16, 32, 64, 128))``: (B, in_channels, D, H, W) ->
(B, out_channels, D, H, W) logits; every level halves each side (stride 2), so D, H, W must be divisible by
``2 ** (len(channels) - 1)``.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mdbench.models.registry import RANDOM_INIT, register_model

__all__ = ["build_unet3d"]


@register_model("unet3d", pretrained_weights=False)
def build_unet3d(in_channels: int = 1, out_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128),
                 num_res_units: int = 2) -> nn.Module:
    """MONAI ``UNet(spatial_dims=3)`` with ``channels`` per level, stride 2 between levels, ``num_res_units`` residual
    units per block; random init."""
    from monai.networks.nets import UNet  # MONAI takes seconds to import: only the models that need it pay

    channels = tuple(channels)
    net = UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=num_res_units)
    # torch's stub types Module.__setattr__'s value as Tensor | Module; any value is stored
    net.mdbench_init = RANDOM_INIT  # type: ignore[assignment]
    return net

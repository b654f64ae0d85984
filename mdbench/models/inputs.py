"""Input checks shared by the feature extractors that wrap a foundation model."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rgb_batch_at_size(x: torch.Tensor, size: int | None, owner: str) -> torch.Tensor:
    """Check that ``x`` is a (B, 3, H, W) batch and resize it (bilinear) to ``size`` x ``size`` when they differ.

    Args:
        x: (B, 3, H, W) images in [0, 1].
        size: the side the model needs, or None to keep ``x`` as given.
        owner: who refuses a wrong shape, for the error message (e.g. "the FM 'litemedsam'").

    Returns:
        (B, 3, size, size) images, or ``x`` itself when no resizing is needed.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{owner} takes (B, 3, H, W) images in [0, 1], got {tuple(x.shape)}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x

"""Inputs shared by the models: checks of the feature extractors that wrap a foundation model, and host values
copied to a GPU without stalling it."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def host_to_device(values: torch.Tensor | np.ndarray | Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Host values (indices, lengths, labels, masks) as a tensor on ``device`` without waiting for the GPU.

    On CUDA the copy goes through pinned memory and does not block: a blocking copy, or one from pageable memory,
    waits for every kernel queued before it, which on a training step's hot path idles the GPU once per step.
    """
    tensor = torch.as_tensor(values)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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

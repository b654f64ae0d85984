"""Multiple-instance learning (MIL) plumbing shared by the synthetic and the real bag datasets.

A bag item is ``(instances (n, ...), bag_label int, instance_labels LongTensor (n,))`` with
``bag_label == int(instance_labels.max())``: the standard MIL assumption, a bag is positive iff it
holds at least one key instance.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


class MILBatch(NamedTuple):
    """A zero-padded batch of bags of different sizes; with the MIL convention of batch size 1, B = 1."""

    instances: torch.Tensor  # (B, N_max, ...) zero-padded
    mask: torch.Tensor  # (B, N_max) bool, True for real instances
    bag_labels: torch.Tensor  # (B,) int64
    instance_labels: torch.Tensor  # (B, N_max) int64, -1 for padding


def collate_bags(batch: Sequence[tuple[torch.Tensor, int, torch.Tensor]]) -> MILBatch:
    """``DataLoader`` collate for bags of different sizes: pads to the largest bag and returns a mask."""
    instances, bag_labels, instance_labels = zip(*batch, strict=True)
    sizes = torch.tensor([len(x) for x in instances])
    mask = torch.arange(int(sizes.max()))[None, :] < sizes[:, None]
    return MILBatch(
        instances=pad_sequence(list(instances), batch_first=True),
        mask=mask,
        bag_labels=torch.as_tensor(bag_labels, dtype=torch.int64),
        instance_labels=pad_sequence(list(instance_labels), batch_first=True, padding_value=-1),
    )


def balanced_bag_labels(rng: np.random.Generator, n_bags: int, positive_fraction: float) -> np.ndarray:
    """Shuffled int64 bag labels with exactly ``round(n_bags * positive_fraction)`` positives."""
    if not 0 <= positive_fraction <= 1:
        raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
    n_pos = round(n_bags * positive_fraction)
    return rng.permutation(np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n_bags - n_pos, dtype=np.int64)])


def draw_instance_labels(
    rng: np.random.Generator, bag_label: int, bag_size: tuple[int, int], n_key: tuple[int, int]
) -> np.ndarray:
    """Instance labels (n,) of one bag: size uniform in ``bag_size``; a positive bag holds
    ``n_key`` (uniform in the inclusive range, at most the size) key instances at random positions."""
    if not 1 <= bag_size[0] <= bag_size[1] or not 1 <= n_key[0] <= n_key[1]:
        raise ValueError(f"bag_size and n_key must be ranges 1 <= min <= max, got {bag_size} and {n_key}")
    size = int(rng.integers(bag_size[0], bag_size[1] + 1))
    keys = min(int(rng.integers(n_key[0], n_key[1] + 1)), size) if bag_label else 0
    return rng.permutation(np.r_[np.ones(keys, dtype=np.int64), np.zeros(size - keys, dtype=np.int64)])


def _windows(h: int, w: int, tile: int, stride: int | None, what: str) -> int:
    """The stride of :func:`tile_image`'s windows (``tile`` when None), checked to cover an h x w image exactly."""
    stride = stride or tile
    if not 0 < stride <= tile or (h - tile) % stride or (w - tile) % stride or min(h, w) < tile:
        raise ValueError(f"{what} of size {h}x{w} is not covered exactly by {tile}-pixel tiles at stride {stride} "
                         f"(need 0 < stride <= tile and (side - tile) divisible by the stride)")
    return stride


def tile_image(image: torch.Tensor, tile: int, stride: int | None = None) -> torch.Tensor:
    """Cut (C,H,W) into ``tile``-pixel squares every ``stride`` pixels (default ``tile``: non-overlapping),
    row-major: (((H - tile) / stride + 1) * ((W - tile) / stride + 1), C, tile, tile)."""
    c, h, w = image.shape
    stride = _windows(h, w, tile, stride, "image")
    return image.unfold(1, tile, stride).unfold(2, tile, stride).permute(1, 2, 0, 3, 4).reshape(-1, c, tile, tile)


def tile_fractions(mask: torch.Tensor, tile: int, stride: int | None = None) -> torch.Tensor:
    """Foreground fraction of every tile of an (H,W) mask, in :func:`tile_image`'s order: (n,) float."""
    h, w = mask.shape
    stride = _windows(h, w, tile, stride, "mask")
    return F.avg_pool2d((mask > 0).float()[None, None], tile, stride).flatten()

"""Kvasir-SEG (Jha et al. 2020): colonoscopy polyp segmentation.

Layout: ``<folder>/Kvasir-SEG/images/<id>.jpg`` and ``<folder>/Kvasir-SEG/masks/<id>.jpg``. The masks
are JPEG as released, so their edges hold grey values: foreground is grey >= 128. No official split:
a seeded random 70/15/15 split (:func:`mdbench.data.splits.split_indices`, no labels to stratify by).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mdbench.data.base import ImageMaskDataset
from mdbench.data.errors import DataNotFoundError, LabelError
from mdbench.data.io import require_dir
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED

SUBFOLDER = "Kvasir-SEG"
CLASSES = ("background", "polyp")


class KvasirSegDataset(ImageMaskDataset):
    """Polyp image/mask pairs as ``{"image": (3, H, W) float, "mask": (H, W) long {0, 1}, "id": str}``.

    Args:
        folder: the ``kvasir_seg`` folder (holding ``Kvasir-SEG``).
        split: "train", "val", "test" or "all".
        image_size: resize to (image_size, image_size), bilinear for images, nearest for masks.
        foreground_only: skip cases whose mask is empty (count logged).
        seed, fractions: the seeded split.
        transform: applied to the item dict.
    """

    name = "kvasir_seg"
    classes = CLASSES

    def __init__(self, folder: Path | str, split: str = "train", image_size: int | None = None,
                 foreground_only: bool = False, seed: int = DEFAULT_SEED,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        self.image_size = image_size
        image_dir = require_dir(self.folder / SUBFOLDER / "images", "Kvasir-SEG image folder")
        mask_dir = require_dir(self.folder / SUBFOLDER / "masks", "Kvasir-SEG mask folder")
        self.image_paths = sorted(image_dir.glob("*.jpg"))
        if not self.image_paths:
            raise DataNotFoundError(f"no *.jpg images in {image_dir}")
        self.ids = [p.stem for p in self.image_paths]
        self.mask_paths = [mask_dir / p.name for p in self.image_paths]
        unmatched = [p for p in self.mask_paths if not p.is_file()]
        if unmatched:
            raise DataNotFoundError(f"{len(unmatched)} Kvasir-SEG images have no mask, "
                                    f"e.g. {unmatched[0]} is missing")
        orphans = sorted({p.name for p in mask_dir.glob("*.jpg")} - {p.name for p in self.image_paths})
        if orphans:
            raise LabelError(f"{len(orphans)} masks in {mask_dir} have no image, e.g. {orphans[0]}")
        self._select(len(self.ids))
        if foreground_only:
            self._keep_foreground()

"""HC18 (van den Heuvel et al. 2018): fetal head segmentation in 2D ultrasound.

Layout::

    <folder>/training_set/NNN_HC.png, NNN_HC_Annotation.png   (also NNN_2HC.png ... for repeat scans)
    <folder>/training_set_pixel_size_and_HC.csv   (filename, pixel size(mm), head circumference (mm))

The official annotations are 1-pixel ellipse outlines; some copies (the shared subset) hold filled
ellipses. :func:`fill_annotation` turns either into a filled head mask. Only the training set has
annotations, so the split is a seeded random 70/15/15 one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from mdbench.data.base import ImageMaskDataset
from mdbench.data.errors import CorruptFileError, DataNotFoundError, LabelError
from mdbench.data.io import read_binary_mask, require_dir, require_file
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED

IMAGE_DIR = "training_set"
PIXEL_CSV = "training_set_pixel_size_and_HC.csv"
CLASSES = ("background", "head")
# A filled ellipse keeps most of its pixels under a 3x3 erosion; a 1-2 pixel outline keeps almost none.
_FILLED_FRACTION = 0.5


def fill_annotation(mask: np.ndarray) -> np.ndarray:
    """Filled head mask (H, W) bool from an annotation that is either a filled ellipse or its outline.

    A closed outline is filled by ``scipy.ndimage.binary_fill_holes``. An outline cut open by the image
    border encloses no hole, so then the background region holding the outline's centroid is taken:
    the centroid of points on a convex curve lies inside it (a fallback no library offers).
    """
    mask = mask.astype(bool)
    if not mask.any():
        return mask
    if ndimage.binary_erosion(mask).sum() >= _FILLED_FRACTION * mask.sum():
        return ndimage.binary_fill_holes(mask)
    filled = ndimage.binary_fill_holes(mask)
    if filled.sum() > mask.sum():
        return filled
    regions, _ = ndimage.label(~mask)
    cy, cx = (int(round(c)) for c in ndimage.center_of_mass(mask))
    inside = regions[cy, cx]
    return mask | (regions == inside) if inside else mask


def read_pixel_sizes(csv_path: Path) -> dict[str, tuple[float, float]]:
    """``filename -> (pixel size mm, head circumference mm)`` from the HC18 CSV."""
    require_file(csv_path, "HC18 pixel-size CSV")
    try:
        table = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"cannot parse {csv_path}: {err}") from err
    if len(table.columns) < 3 or table.columns[0] != "filename":
        raise LabelError(f"{csv_path} must have columns filename, pixel size(mm), head circumference (mm)")
    return {str(r[0]): (float(r[1]), float(r[2])) for r in table.itertuples(index=False)}


class HC18Dataset(ImageMaskDataset):
    """Ultrasound image/head-mask pairs.

    Items: ``{"image": FloatTensor (3, H, W) in [0, 1], "mask": LongTensor (H, W) in {0, 1}, "id": str,
    "spacing": (row mm, col mm) per pixel of the returned tensors, "hc_mm": float}``. The grey image is
    repeated to 3 channels (foundation models take RGB).

    Args:
        folder: the ``hc18`` folder.
        split: "train", "val", "test" or "all".
        image_size: resize to (image_size, image_size); spacing is rescaled to match.
        foreground_only: skip cases whose mask is empty (count logged).
        seed, fractions: the seeded split.
        transform: applied to the item dict.
    """

    name = "hc18"
    classes = CLASSES

    def __init__(self, folder: Path | str, split: str = "train", image_size: int | None = None,
                 foreground_only: bool = False, seed: int = DEFAULT_SEED,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        self.image_size = image_size
        image_dir = require_dir(self.folder / IMAGE_DIR, "HC18 training_set folder")
        self.csv_path = self.folder / PIXEL_CSV
        self.pixel = read_pixel_sizes(self.csv_path)
        self.image_paths = sorted(p for p in image_dir.glob("*HC.png"))
        if not self.image_paths:
            raise DataNotFoundError(f"no *_HC.png images in {image_dir}")
        self.ids = [p.stem for p in self.image_paths]
        self.mask_paths = [p.with_name(f"{p.stem}_Annotation.png") for p in self.image_paths]
        for path in self.mask_paths:
            require_file(path, "HC18 annotation")
        unlisted = [p.name for p in self.image_paths if p.name not in self.pixel]
        if unlisted:
            raise LabelError(f"{len(unlisted)} images are not in {self.csv_path}, e.g. {unlisted[0]}")
        self._select(len(self.ids))
        if foreground_only:
            self._keep_foreground()

    def _read_mask(self, case: int) -> np.ndarray:
        return fill_annotation(read_binary_mask(self.mask_paths[case]))

    def _extras(self, case: int, image_hw: tuple[int, int]) -> dict[str, Any]:
        size, hc = self.pixel[self.image_paths[case].name]
        h, w = image_hw
        spacing = (size, size) if self.image_size is None else (size * h / self.image_size,
                                                                size * w / self.image_size)
        return {"spacing": spacing, "hc_mm": hc}

    def source_files(self) -> list[Path]:
        return super().source_files() + [self.csv_path]

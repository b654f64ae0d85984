"""ISIC 2017 (Codella et al. 2018): dermoscopy, lesion segmentation and 3-class diagnosis.

Layout (official training release)::

    <folder>/ISIC-2017_Training_Data/ISIC_NNNNNNN.jpg
    <folder>/ISIC-2017_Training_Part1_GroundTruth/ISIC_NNNNNNN_segmentation.png
    <folder>/ISIC-2017_Training_Part3_GroundTruth.csv    (image_id, melanoma, seborrheic_keratosis)

Only images present on disk are used: CSV rows without an image are skipped (count logged), an image
without a CSV row is a :class:`LabelError`. One seeded 70/15/15 split, stratified by diagnosis, serves
both tasks, so a case is in the same split for classification and segmentation.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mdbench.data.base import ImageMaskDataset
from mdbench.data.errors import CorruptFileError, LabelError
from mdbench.data.io import channels_mode, image_tensor, read_image, require_dir, require_file
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED

log = logging.getLogger(__name__)

IMAGE_DIR = "ISIC-2017_Training_Data"
MASK_DIR = "ISIC-2017_Training_Part1_GroundTruth"
LABEL_CSV = "ISIC-2017_Training_Part3_GroundTruth.csv"
CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")


def read_labels(csv_path: Path) -> dict[str, int]:
    """``image_id -> class index`` from the Part 3 CSV: melanoma 0, seborrheic keratosis 1, else nevus 2."""
    require_file(csv_path, "ISIC 2017 label CSV")
    try:
        table = pd.read_csv(csv_path, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"cannot parse {csv_path}: {err}") from err
    missing = {"image_id", "melanoma", "seborrheic_keratosis"} - set(table.columns)
    if missing:
        raise LabelError(f"{csv_path} lacks columns {sorted(missing)}")
    flags = table[["melanoma", "seborrheic_keratosis"]].to_numpy()
    bad = ~np.isin(flags, (0, 1)).all(axis=1) | (flags.sum(axis=1) > 1)
    if bad.any():
        raise LabelError(f"{csv_path}: rows for {table.image_id[bad].tolist()[:5]} are not one-hot "
                         "(melanoma and seborrheic_keratosis must be 0/1 and not both 1)")
    labels = np.where(flags[:, 0] == 1, 0, np.where(flags[:, 1] == 1, 1, 2))
    return dict(zip(table.image_id, labels.tolist(), strict=True))


class ISIC2017Dataset(ImageMaskDataset):
    """ISIC 2017 training images for one task.

    Items:
        classification: ``(FloatTensor (C, H, W) in [0, 1], label int)``, label indexing :data:`CLASSES`.
        segmentation: ``{"image": FloatTensor (3, H, W), "mask": LongTensor (H, W) in {0, 1}, "id": str}``.

    Args:
        folder: the ``isic2017`` folder.
        split: "train", "val", "test" or "all".
        task: "classification" or "segmentation".
        image_size: resize to (image_size, image_size), bilinear for images, nearest for masks.
        channels: classification only; 3 (default) or 1.
        foreground_only: segmentation only; skip cases whose mask is empty (count logged).
        seed, fractions: the seeded stratified split.
        transform: applied to the image tensor (classification) or the item dict (segmentation).
    """

    name = "isic2017"
    classes = CLASSES

    def __init__(self, folder: Path | str, split: str = "train",
                 task: Literal["classification", "segmentation"] = "classification",
                 image_size: int | None = None, channels: int | None = 3, foreground_only: bool = False,
                 seed: int = DEFAULT_SEED, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
        if foreground_only and task != "segmentation":
            raise ValueError("foreground_only applies to task='segmentation' only")
        self.task = task
        self.image_size = image_size
        self.mode = channels_mode(channels)
        self.csv_path = self.folder / LABEL_CSV
        table = read_labels(self.csv_path)
        image_dir = require_dir(self.folder / IMAGE_DIR, "ISIC 2017 image folder")
        # The full release also holds *_superpixels.png and a metadata CSV there: only the .jpg are images.
        self.image_paths = sorted(image_dir.glob("ISIC_*.jpg"))
        if not self.image_paths:
            raise LabelError(f"no ISIC_*.jpg images in {image_dir}")
        self.ids = [p.stem for p in self.image_paths]
        unlabelled = [p for p in self.image_paths if p.stem not in table]
        if unlabelled:
            raise LabelError(f"{len(unlabelled)} images have no row in {self.csv_path}, e.g. {unlabelled[0]}")
        skipped = len(table) - len(self.ids)
        if skipped:
            log.warning("ISIC 2017: %d rows of %s have no image in %s; using the %d present",
                        skipped, self.csv_path.name, image_dir, len(self.ids))
        self.labels = [table[i] for i in self.ids]
        self.mask_paths = [self.folder / MASK_DIR / f"{i}_segmentation.png" for i in self.ids]
        if task == "segmentation":
            require_dir(self.folder / MASK_DIR, "ISIC 2017 mask folder")
            for path in self.mask_paths:
                require_file(path, "ISIC 2017 mask")
        self._select(len(self.ids), self.labels)
        if foreground_only:
            self._keep_foreground()

    def source_files(self) -> list[Path]:
        extra = self.mask_paths if self.task == "segmentation" else []
        return self.image_paths + extra + [self.csv_path]

    def __getitem__(self, i: int) -> Any:
        if self.task == "segmentation":
            return super().__getitem__(i)
        case = int(self.indices[i])
        image = image_tensor(read_image(self.image_paths[case], self.mode), self.image_size)
        return self._apply(image), self.labels[case]

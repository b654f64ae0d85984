"""PBC (Acevedo et al. 2020): peripheral blood cell microscopy, 8-class classification.

Layout: ``<folder>/PBC_dataset_normal_DIB/<class>/*.jpg`` with the 8 official class folders. No
official split: a seeded stratified 70/15/15 split (:func:`mdbench.data.splits.split_indices`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mdbench.data.base import RealDataset
from mdbench.data.errors import LabelError
from mdbench.data.io import channels_mode, image_tensor, read_image, require_dir
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED

log = logging.getLogger(__name__)

SUBFOLDER = "PBC_dataset_normal_DIB"
CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
IMAGE_SUFFIXES = (".jpg", ".jpeg")


class PBCDataset(RealDataset):
    """Blood-cell images as ``(FloatTensor (C, H, W) in [0, 1], label int)``, label indexing :data:`CLASSES`.

    Args:
        folder: the ``pbc`` folder (holding ``PBC_dataset_normal_DIB``).
        split: "train", "val", "test" or "all".
        image_size: resize to (image_size, image_size), bilinear; None keeps the file's size.
        channels: 3 (RGB, default) or 1 (grey).
        seed, fractions: the seeded stratified split.
        transform: applied to the image tensor.

    A missing class folder is allowed (logged): labels keep their official numbering. A folder that is
    not one of the 8 classes is a :class:`LabelError`.
    """

    name = "pbc"
    classes = CLASSES

    def __init__(self, folder: Path | str, split: str = "train", image_size: int | None = None,
                 channels: int | None = 3, seed: int = DEFAULT_SEED,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        self.image_size = image_size
        self.mode = channels_mode(channels)
        root = require_dir(self.folder / SUBFOLDER, "PBC image folder")
        unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in CLASSES)
        if unknown:
            raise LabelError(f"{root} has folders {unknown} that are not PBC classes {list(CLASSES)}")
        self.paths: list[Path] = []
        self.labels: list[int] = []
        for label, cls in enumerate(CLASSES):
            files = sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                log.warning("PBC: no images for class %r in %s", cls, root / cls)
            self.paths += files
            self.labels += [label] * len(files)
        if not self.paths:
            raise LabelError(f"no PBC images (*.jpg) under {root}")
        self._select(len(self.paths), self.labels)

    @property
    def files(self) -> list[Path]:
        """Image files of this split, in item order."""
        return [self.paths[c] for c in self.indices]

    def source_files(self) -> list[Path]:
        return self.paths

    def __getitem__(self, i: int) -> tuple[Any, int]:
        case = int(self.indices[i])
        image = image_tensor(read_image(self.paths[case], self.mode), self.image_size)
        return self._apply(image), self.labels[case]

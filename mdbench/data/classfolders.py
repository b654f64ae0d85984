"""Your own classification images in class folders (torchvision's ``ImageFolder`` layout).

Layout: ``<folder>/<class name>/<image>`` with one sub-folder per class (at least two, each holding at least one
image); the classes are the sub-folders' names in sorted order, so label ``k`` is the ``k``-th name. Images are PNG,
JPEG, BMP or TIFF files; hidden files (``.DS_Store``) and files beside the class folders (a README, SHA256SUMS) are
ignored, any other file inside a class folder is refused. There is no official split: a seeded stratified 70/15/15
one over the images (:func:`mdbench.data.splits.split_indices`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdbench.data.base import RealDataset
from mdbench.data.errors import LabelError
from mdbench.data.io import channels_mode, image_tensor, read_image
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def scan_class_folders(folder: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """(class names, image paths, labels (N,) int64) of a class-folder tree, images sorted by path; a
    :class:`LabelError` naming the fix for fewer than two classes, an empty class or a file that is not an image."""
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise LabelError(f"{folder} holds {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a "
                         "classification dataset in the classfolders layout needs one sub-folder per class, at least "
                         "two, each holding that class's images (<folder>/<class>/<image>.png)")
    paths, labels, strays = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        strays += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise LabelError(f"class folder {folder / name} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        paths += images
        labels += [label] * len(images)
    if strays:
        listed = ", ".join(str(p.relative_to(folder)) for p in strays[:5])
        raise LabelError(f"{folder}: {len(strays)} file(s) in class folders are not images "
                         f"({', '.join(IMAGE_SUFFIXES)}): {listed}{' ...' if len(strays) > 5 else ''}; move them out")
    return classes, paths, np.asarray(labels, dtype=np.int64)


class ClassFolderDataset(RealDataset):
    """Images of class folders as ``(FloatTensor (C, H, W) in [0, 1], label int)``.

    Args:
        folder: the folder that holds one sub-folder per class.
        split: "train", "val", "test" or "all" (seeded stratified 70/15/15 over the images).
        image_size: resize to (image_size, image_size), bilinear; None keeps each file's size (then batch them
            only if they share one).
        channels: None keeps the file's own (grey C=1, else RGB C=3), 1 grey, 3 RGB.
        seed, fractions: the seeded split.
        transform: applied to the image tensor.
    """

    name = "classfolders"

    def __init__(self, folder: Path | str, split: str = "train", image_size: int | None = None,
                 channels: int | None = None, seed: int = DEFAULT_SEED, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        self.image_size, self.mode = image_size, channels_mode(channels)
        self.classes, self.image_paths, self.labels = scan_class_folders(self.folder)
        self._select(len(self.labels), self.labels)

    @property
    def files(self) -> list[Path]:
        """Image files of this split, in item order."""
        return [self.image_paths[c] for c in self.indices]

    def source_files(self) -> list[Path]:
        return list(self.image_paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        case = int(self.indices[i])
        img = read_image(self.image_paths[case], self.mode)
        return self._apply(image_tensor(img, self.image_size)), int(self.labels[case])

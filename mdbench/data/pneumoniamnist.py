"""PneumoniaMNIST (MedMNIST v2, Yang et al. 2023): paediatric chest X-ray, normal vs pneumonia.

Layout: ``<folder>/pneumoniamnist.npz`` (``pneumoniamnist_{64,128,224}.npz`` for the larger sizes) with
keys ``{train,val,test}_{images,labels}``, read through the ``medmnist`` package. The official
train/val/test split inside the file is used as is.
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mdbench.data.base import RealDataset
from mdbench.data.errors import CorruptFileError, LabelError
from mdbench.data.io import channels_mode, image_tensor, require_file
from mdbench.data.splits import check_split

CLASSES = ("normal", "pneumonia")
SIZES = (28, 64, 128, 224)


class PneumoniaMNISTDataset(RealDataset):
    """Chest X-rays as ``(FloatTensor (C, H, W) in [0, 1], label int)``; 0 normal, 1 pneumonia.

    Args:
        folder: the ``pneumoniamnist`` folder.
        split: "train", "val" or "test" (the official split in the npz).
        size: which MedMNIST file to read: 28 (``pneumoniamnist.npz``), 64, 128 or 224.
        image_size: resize to (image_size, image_size), bilinear; None keeps ``size``.
        channels: None or 1 keeps grey (C=1); 3 repeats it to RGB.
        transform: applied to the image tensor.
    """

    name = "pneumoniamnist"
    classes = CLASSES

    def __init__(self, folder: Path | str, split: str = "train", size: int = 28,
                 image_size: int | None = None, channels: int | None = None,
                 transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(folder, check_split(split, ("train", "val", "test")), transform=transform)
        self.image_size = image_size
        self.mode = channels_mode(channels)
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES} (the MedMNIST files), got {size!r}")
        self.npz_path = require_file(self.folder / (f"pneumoniamnist_{size}.npz" if size != 28
                                                    else "pneumoniamnist.npz"), "PneumoniaMNIST file")
        # Imported here: medmnist pulls in torchvision (seconds), which listing datasets does not need.
        import medmnist

        try:
            data = medmnist.PneumoniaMNIST(split=split, root=str(self.folder), download=False, size=size)
            self.images = np.asarray(data.imgs)
            labels = np.asarray(data.labels).reshape(-1)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise CorruptFileError(f"cannot read split {split!r} from {self.npz_path}: {err!r}") from err
        if self.images.ndim != 3 or len(self.images) != len(labels):
            raise LabelError(f"{self.npz_path}: {split}_images has shape {self.images.shape} for "
                             f"{len(labels)} labels; expected (N, H, W) grey images")
        if not np.isin(labels, (0, 1)).all():
            raise LabelError(f"{self.npz_path}: {split}_labels has values "
                             f"{sorted(set(labels.tolist()) - {0, 1})} outside 0..1 ({', '.join(CLASSES)})")
        self.labels = labels.astype(np.int64)
        self.indices = np.arange(len(labels))

    def source_files(self) -> list[Path]:
        return [self.npz_path]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        case = int(self.indices[i])
        img = Image.fromarray(self.images[case])
        if self.mode:
            img = img.convert(self.mode)
        return self._apply(image_tensor(img, self.image_size)), int(self.labels[case])

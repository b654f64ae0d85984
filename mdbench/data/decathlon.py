"""3D segmentation volumes in the Medical Segmentation Decathlon layout (Antonelli et al. 2022), yours or the MSD's.

Layout: ``<folder>/dataset.json`` whose ``training`` list names (image, label) NIfTI pairs, conventionally
``./imagesTr/<case>.nii.gz`` / ``./labelsTr/<case>.nii.gz``, and whose ``labels`` map ``"0".."K-1"`` to class names
(``"0"`` the background). One single-channel 3D volume per image; its label volume has the same shape and values
in 0..K-1. Only the training pairs have labels, so the split is a seeded random 70/15/15 one over them.

Volumes are reoriented to RAS+ (``nibabel.as_closest_canonical``), so the array axes (D, H, W) are nibabel's
(x: left->right, y: posterior->anterior, z: inferior->superior). Shapes may vary per case; pass ``spatial_size``
to batch them, resampled to it or zero-padded to it at their own resolution (``resize="pad"``).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from mdbench.data.base import RealDataset
from mdbench.data.errors import CorruptFileError, DataNotFoundError, LabelError
from mdbench.data.io import require_dir, require_file
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED


def read_dataset_json(path: Path) -> tuple[list[tuple[Path, Path]], tuple[str, ...]]:
    """(image, label) path pairs and lower-cased class names from a Decathlon ``dataset.json``."""
    require_file(path, "Decathlon dataset.json")
    try:
        meta = json.loads(path.read_text())
        pairs = [(path.parent / e["image"], path.parent / e["label"]) for e in meta["training"]]
        labels = meta["labels"]
        classes = tuple(labels[str(k)].lower() for k in range(len(labels)))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{path} is not a Decathlon dataset.json (training pairs, labels 0..K-1): "
                               f"{err!r}") from err
    return pairs, classes


def read_volume(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """RAS-oriented 3D array and voxel spacing (mm) of a NIfTI file; non-3D is a :class:`LabelError`."""
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError as err:
        raise DataNotFoundError(f"NIfTI file {path} not found") from err
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise CorruptFileError(f"cannot read NIfTI file {path}: {err!r}") from err
    if data.ndim != 3:
        raise LabelError(f"{path} has shape {data.shape}; expected a 3D volume")
    return data, tuple(float(z) for z in img.header.get_zooms()[:3])


class DecathlonDataset(RealDataset):
    """Decathlon-layout volumes with their label volumes.

    Items: ``{"image": FloatTensor (1, D, H, W), "label": LongTensor (D, H, W) in 0..K-1,
    "spacing": (sx, sy, sz) mm of the returned voxels, "extent": (d, h, w) the corner of the returned grid that
    holds the volume (the whole grid unless padded), "id": str}``.

    Args:
        folder: the folder that holds ``dataset.json`` (in a subclass, the one that holds :attr:`subfolder`).
        split: "train", "val", "test" or "all".
        normalize: "zscore" (default; per volume, as nnU-Net does for MRI) or "minmax" (per volume to [0, 1]).
        spatial_size: (D, H, W) every volume is brought to (``resize``). None keeps each volume's own shape.
        resize: "resample" (MONAI ``Resize``: trilinear image, nearest label; the spacing is rescaled to match) or
            "pad" (MONAI ``SpatialPad`` with zeros after the end of each axis, after normalising: the voxels stay
            the data's own; a volume larger than ``spatial_size`` on any axis is refused).
        seed, fractions: the seeded split.
        transform: applied to the item dict.
    """

    name = "decathlon"
    subfolder = ""  # where dataset.json is, under ``folder`` (the MSD tasks: Task04_Hippocampus, ...)

    def __init__(self, folder: Path | str, split: str = "train",
                 normalize: Literal["zscore", "minmax"] = "zscore",
                 spatial_size: Sequence[int] | None = None, resize: Literal["resample", "pad"] = "resample",
                 seed: int = DEFAULT_SEED, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        if normalize not in ("zscore", "minmax"):
            raise ValueError(f"normalize must be 'zscore' or 'minmax', got {normalize!r}")
        if resize not in ("resample", "pad"):
            raise ValueError(f"resize must be 'resample' or 'pad', got {resize!r}")
        self.normalize, self.resize = normalize, resize
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        task_dir = require_dir(self.folder / self.subfolder, f"{self.name} folder")
        self.json_path = task_dir / "dataset.json"
        pairs, self.classes = read_dataset_json(self.json_path)
        if not pairs or len(self.classes) < 2:
            raise LabelError(f"{self.json_path} lists {len(pairs)} training pair(s) and {len(self.classes)} label(s); "
                             "a segmentation dataset needs at least one pair and labels 0 (background) and 1")
        pairs = sorted(pairs)
        for image, label in pairs:
            require_file(image, f"volume listed in {self.json_path}:")
            require_file(label, f"label listed in {self.json_path}:")
        self.image_paths = [p for p, _ in pairs]
        self.label_paths = [p for _, p in pairs]
        self.ids = [p.name.removesuffix(".nii.gz").removesuffix(".nii") for p in self.image_paths]
        self._select(len(pairs))
        self._resize = self._resizers(self.spatial_size, resize) if self.spatial_size else None

    @staticmethod
    def _resizers(spatial_size: tuple[int, ...], resize: str) -> tuple[Callable, Callable]:
        # Imported here: MONAI takes seconds to import and only resizing needs it.
        from monai.transforms import Resize, SpatialPad

        if resize == "pad":
            pad = SpatialPad(spatial_size, method="end")
            return pad, pad
        return (Resize(spatial_size, mode="trilinear"), Resize(spatial_size, mode="nearest"))

    @property
    def files(self) -> list[Path]:
        """Image volumes of this split, in item order."""
        return [self.image_paths[c] for c in self.indices]

    def source_files(self) -> list[Path]:
        return self.image_paths + self.label_paths + [self.json_path]

    def _normalized(self, volume: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(volume.astype(np.float32))
        if self.normalize == "zscore":
            return (x - x.mean()) / x.std().clamp_min(1e-8)
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def __getitem__(self, i: int) -> dict[str, Any]:
        case = int(self.indices[i])
        image, spacing = read_volume(self.image_paths[case])
        label, _ = read_volume(self.label_paths[case])
        if image.shape != label.shape:
            raise LabelError(f"label {self.label_paths[case]} has shape {label.shape}, "
                             f"its image {image.shape}")
        if not np.isin(label, np.arange(len(self.classes))).all():
            bad = sorted(set(np.unique(label).tolist()) - set(range(len(self.classes))))
            raise LabelError(f"label {self.label_paths[case]} has values {bad} outside "
                             f"0..{len(self.classes) - 1} ({', '.join(self.classes)})")
        x = self._normalized(image)[None]
        y = torch.from_numpy(label.astype(np.int64))[None]
        extent = tuple(image.shape)
        if self._resize is not None:
            assert self.spatial_size is not None  # _resize exists only for a spatial_size (__init__)
            if self.resize == "pad":
                if any(n > m for n, m in zip(image.shape, self.spatial_size, strict=True)):
                    raise ValueError(f"{self.image_paths[case].name} has shape {image.shape}, larger than the "
                                     f"spatial_size {self.spatial_size} it would be padded to")
            else:
                spacing = tuple(s * n / m for s, n, m in zip(spacing, image.shape, self.spatial_size, strict=True))
                extent = self.spatial_size
            x = self._resize[0](x).as_tensor()
            y = self._resize[1](y.float()).as_tensor().round().long()
        return self._apply({"image": x, "label": y[0], "spacing": spacing, "extent": extent, "id": self.ids[case]})

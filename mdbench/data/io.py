"""Safe file access for the loaders: folders that must exist, images decoded in full, masks binarised.

Every failure becomes a :mod:`mdbench.data.errors` exception naming the file, raised where the file is
read, so a broken file never surfaces as a bare PIL error deep inside a DataLoader worker.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mdbench.data.errors import CorruptFileError, DataNotFoundError, LabelError

HOW_TO_FIX = ("download the dataset in its official layout (see its data card in data_cards/) and pass "
              "--data-dir DIR (or set MDBENCH_DATA_DIR) to the folder that holds it")


def require_dir(path: Path, what: str = "data folder") -> Path:
    """Return ``path`` if it is a folder, else raise :class:`DataNotFoundError` saying how to fix it."""
    if not path.is_dir():
        raise DataNotFoundError(f"{what} {path} not found: {HOW_TO_FIX}")
    return path


def require_file(path: Path, what: str = "file") -> Path:
    """Return ``path`` if it is a file, else raise :class:`DataNotFoundError` naming it."""
    if not path.is_file():
        raise DataNotFoundError(f"{what} {path} not found: {HOW_TO_FIX}")
    return path


def read_image(path: Path, mode: str | None = None) -> Image.Image:
    """Decode the whole image at ``path`` (so truncation is caught here), converted to ``mode`` if given."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode and img.mode != mode else img.copy()
    except FileNotFoundError as err:
        raise DataNotFoundError(f"image {path} not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptFileError(f"cannot decode image {path}: {err}") from err


def channels_mode(channels: int | None) -> str | None:
    """PIL mode for a requested channel count: None keeps the file's own, 1 -> "L", 3 -> "RGB"."""
    modes = {None: None, 1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    return modes[channels]


def image_tensor(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> FloatTensor (C, H, W) in [0, 1]; ``size`` resizes to (size, size), bilinear."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if size is not None:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_binary_mask(path: Path, threshold: int = 128) -> np.ndarray:
    """Mask file -> bool array (H, W): grey value >= ``threshold`` is foreground (JPEG masks need it)."""
    return np.asarray(read_image(path, "L")) >= threshold


def mask_tensor(mask: np.ndarray, size: int | None = None) -> torch.Tensor:
    """Bool/int mask (H, W) -> LongTensor (H, W); ``size`` resizes to (size, size), nearest neighbour."""
    if size is not None:
        img = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        mask = np.asarray(img)
    return torch.from_numpy(mask.astype(np.int64))


def check_same_size(image: Image.Image, mask: np.ndarray, mask_path: Path) -> None:
    """Raise :class:`LabelError` naming ``mask_path`` when the mask's (H, W) differs from the image's."""
    if mask.shape != (image.height, image.width):
        raise LabelError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                         f"{image.width}x{image.height} (width x height)")

"""The MedSAM-on-Laptop pre- and post-processing in numpy, equal to :mod:`mdbench.models.litemedsam`'s torch version.

Written by hand because the deployed path must not import torch (3-5 s per fresh process) and OpenCV is not a
dependency of the suite. Resizing is a pair of 1-D interpolation matrices with torch's exact semantics:

- ``"area"`` (shrinking): output i averages input ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``, as
  ``F.interpolate(mode="area")`` (= adaptive average pooling);
- ``"bilinear"`` (enlarging, and logits back to the image size): half-pixel centres, ``align_corners=False``,
  no antialiasing, as ``F.interpolate(mode="bilinear")``.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["IMAGE_SIZE", "as_rgb", "postprocess_logits", "preprocess_image", "resize", "resized_hw", "scale_boxes"]

IMAGE_SIZE = 256


def resized_hw(orig_hw: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the longest side of (H, W) to ``size`` (rounded as the challenge code)."""
    height, width = orig_hw
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@functools.lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D resizing (see the module docstring)."""
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    if mode == "area":
        for i in range(n_out):
            start, end = (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix
    scale = n_in / n_out
    for i in range(n_out):
        source = max((i + 0.5) * scale - 0.5, 0.0)
        low = min(int(source), n_in - 1)
        high = min(low + 1, n_in - 1)
        weight = source - low
        matrix[i, low] += 1.0 - weight
        matrix[i, high] += weight
    return matrix


def resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize the first two axes of an (H, W, ...) float array to ``size`` with ``mode`` ``"area"`` or ``"bilinear"``."""
    if mode not in ("area", "bilinear"):
        raise ValueError(f"mode must be 'area' or 'bilinear', got {mode!r}")
    rows, cols = _matrix(array.shape[0], size[0], mode), _matrix(array.shape[1], size[1], mode)
    out = np.tensordot(rows, array, axes=(1, 0))  # (h, W, ...)
    return np.moveaxis(np.tensordot(cols, out, axes=(1, 1)), 0, 1)  # (h, w, ...)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) image -> (H, W, 3), grey replicated; any other shape is refused."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got {np.shape(image)}")
    return array


def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W[, 1 | 3]) image -> (1, 3, size, size) float32: longest side to ``size``, [0, 1] min-max, zero pad."""
    array = as_rgb(image)
    x = array.astype(np.float32)
    height, width = resized_hw(array.shape[:2], size)
    if (height, width) != array.shape[:2]:
        x = resize(x, (height, width), "area" if height < array.shape[0] else "bilinear")
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
    out = np.zeros((1, 3, size, size), dtype=np.float32)
    out[0, :, :height, :width] = x.transpose(2, 0, 1)
    return out


def scale_boxes(boxes: np.ndarray, orig_hw: tuple[int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """(K, 4) xyxy boxes in original pixels -> (K, 4) float32 in the ``size`` frame: ``trunc(box * size / max(H, W))``."""
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.trunc(array * (size / max(orig_hw))).astype(np.float32)


def postprocess_logits(low_res_logits: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """(K, 1, 256, 256) low-res logits -> (K, H, W) logits: crop the padding away, bilinear resize to (H, W)."""
    height, width = resized_hw(orig_hw, low_res_logits.shape[-1])
    cropped = np.moveaxis(low_res_logits[:, 0, :height, :width], 0, -1)  # (h, w, K)
    return np.moveaxis(resize(cropped, tuple(orig_hw), "bilinear"), -1, 0)

"""The MedSAM-on-Laptop (CVPR 2024) box-prompt case convention: file names, boxes, ``.npz`` read and write.

A case is one ``.npz`` whose name carries the dimensionality and the modality, e.g.
``2DBox_Endoscopy_<id>.npz`` or ``3DBox_MR_<id>.npz``, as in the challenge DAFT was built for (``docs/papers/daft.md``):

- 2D: ``imgs`` (H,W,3) uint8, ``gts`` (H,W) integer instance labels (0 background, 1..K objects;
  uint8, or uint16 when K >= 256), ``boxes`` (K,4) ``[x_min, y_min, x_max, y_max]``.
- 3D: ``imgs`` (D,H,W) uint8, ``gts`` (D,H,W), ``boxes`` (K,6) ``[x_min, y_min, z_min, x_max, y_max, z_max]``,
  ``spacing`` (3,) voxel size in mm, given here per array axis (D,H,W).

Boxes written by this suite are the tight bounding boxes of the labels, corners as inclusive pixel
indices, row k for label k+1. ``gts`` is optional when reading (the challenge's test inputs lack it).

One reader (:func:`read_boxprompt_case`), one writer (:func:`save_boxprompt_case`) and one validator behind both.

The model side of the convention, in numpy (LiteMedSAM's torch version in :mod:`mdbench.models.litemedsam` equals
it): images enter at :data:`IMAGE_SIZE` (longest side resized, [0, 1] min-max, zero-padded), boxes are scaled to
that frame, low-res logits go back to the image size (:func:`preprocess_image`, :func:`scale_boxes`,
:func:`postprocess_logits`). Written by hand because DAFT's deployed path must not import torch (3-5 s per fresh
process) and OpenCV is not a dependency of the suite. Resizing is a pair of 1-D interpolation matrices with torch's
exact semantics:

- ``"area"`` (shrinking): output i averages input ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``, as
  ``F.interpolate(mode="area")`` (= adaptive average pooling);
- ``"bilinear"`` (enlarging, and logits back to the image size): half-pixel centres, ``align_corners=False``,
  no antialiasing, as ``F.interpolate(mode="bilinear")``.

This module imports neither torch nor anything above the data layer.
"""
from __future__ import annotations

import functools
import math
import re
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from mdbench.data.errors import CorruptFileError, DataNotFoundError
from mdbench.io import atomic_write

# Canonical modality -> accepted name prefixes. Order matters for the substring fall-back in
# modality_of: "OCT" must be tried before "CT" (it contains it) and "PET" before "CT" ("PET-CT").
_MODALITY_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Dermoscopy", ("Dermoscop",)),
    ("Endoscopy", ("Endoscop",)),
    ("Fundus", ("Fundus",)),
    ("Mammography", ("Mamm",)),
    ("Microscopy", ("Microscop",)),
    ("OCT", ("OCT",)),
    ("US", ("US", "Ultra")),
    ("XRay", ("XRay", "X-Ray", "Xray")),  # the challenge spells it both ways
    ("PET", ("PET",)),
    ("CT", ("CT",)),
    ("MR", ("MR",)),
)
MODALITIES = tuple(m for m, _ in _MODALITY_PREFIXES)
_CASE_NAME = re.compile(r"^(?P<dims>[23])DBox_(?P<rest>.+)$")
_KIND = re.compile(r"^[23]DBox_[A-Za-z-]+$")
IMAGE_SIZE = 256  # side of the square frame LiteMedSAM and its students take images in


def modality_from_name(filename: str | Path) -> str | None:
    """Canonical modality (one of :data:`MODALITIES`) a case's file name announces, or None.

    ``"2DBox_Endoscopy_x.npz" -> "Endoscopy"``, ``"3DBox_CT_x.npz" -> "CT"``, ``"2DBox_OCT_x.npz" -> "OCT"``,
    ``"case_17.npz" -> None``. Names without the ``{2,3}DBox_`` prefix fall back to a substring search that
    tries ``OCT`` before ``CT``, as DAFT's router does. Torch-free: DAFT's deployed router uses it.
    """
    name = Path(filename).name
    match = _CASE_NAME.match(name)
    if match:
        for modality, prefixes in _MODALITY_PREFIXES:
            if match["rest"].startswith(prefixes):
                return modality
    for modality, prefixes in _MODALITY_PREFIXES:
        if any(prefix in name for prefix in prefixes):
            return modality
    return None


def modality_of(filename: str | Path) -> str:
    """:func:`modality_from_name`, but a name without a known modality raises ``ValueError`` naming the file."""
    modality = modality_from_name(filename)
    if modality is None:
        name = Path(filename).name
        raise ValueError(f"cannot tell the modality of {name!r}: expected a name like '2DBox_<Modality>_<id>.npz'")
    return modality


def dims_of(filename: str | Path) -> int:
    """2 or 3 from a ``2DBox_``/``3DBox_`` file name; ``ValueError`` naming the file otherwise."""
    match = _CASE_NAME.match(Path(filename).name)
    if not match:
        raise ValueError(f"{Path(filename).name!r} does not follow the '2DBox_…' / '3DBox_…' naming convention")
    return int(match["dims"])


def case_filename(kind: str, case_id: str) -> str:
    """``<kind>_<case_id>.npz`` with ``kind`` like ``"2DBox_US"``; unsafe characters of the id become ``_``."""
    if not _KIND.match(kind):
        raise ValueError(f"kind must look like '2DBox_<Modality>' or '3DBox_<Modality>', got {kind!r}")
    return f"{kind}_{re.sub(r'[^A-Za-z0-9.-]+', '_', str(case_id))}.npz"


def relabel_instances(labels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Renumber the labels of an (H,W) or (D,H,W) map that cover at least ``min_pixels`` to 1..K
    (ascending old id); smaller ones become background. Returns int64, same shape."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got minimum {labels.min()}")
    kept = np.bincount(labels.ravel(), minlength=1) >= min_pixels
    kept[0] = False
    return np.where(kept, np.cumsum(kept), 0)[labels]


def boxes_from_labels(gts: np.ndarray) -> np.ndarray:
    """Tight boxes of labels ``1..gts.max()`` (inclusive corners), in the challenge's coordinate order.

    Args:
        gts: (H,W) or (D,H,W) integer label map.

    Returns:
        int64 (K,4) ``[x_min, y_min, x_max, y_max]`` for 2D or (K,6) ``[x_min, y_min, z_min, x_max,
        y_max, z_max]`` for 3D; row k belongs to the k-th label present, in ascending order.
    """
    if gts.ndim not in (2, 3):
        raise ValueError(f"gts must be 2D or 3D, got shape {gts.shape}")
    slices = [s for s in ndimage.find_objects(gts.astype(np.int64)) if s is not None]
    # slices are in array order (z, y, x); the challenge lists x first
    lows = np.array([[s.start for s in sl[::-1]] for sl in slices], dtype=np.int64).reshape(-1, gts.ndim)
    highs = np.array([[s.stop - 1 for s in sl[::-1]] for sl in slices], dtype=np.int64).reshape(-1, gts.ndim)
    return np.concatenate([lows, highs], axis=1)


def _check_case(case: dict, dims: int, require_gts: bool) -> None:
    """Raise ``ValueError`` describing the first way ``case`` breaks the convention for ``dims``."""
    required = ["imgs", "boxes"] + (["gts"] if require_gts else []) + (["spacing"] if dims == 3 else [])
    missing = [k for k in required if case.get(k) is None]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    imgs, boxes = np.asarray(case["imgs"]), np.asarray(case["boxes"])
    if imgs.dtype != np.uint8:
        raise ValueError(f"imgs must be uint8, got {imgs.dtype}")
    if dims == 2 and (imgs.ndim != 3 or imgs.shape[2] != 3):
        raise ValueError(f"2D imgs must be (H,W,3), got {imgs.shape}")
    if dims == 3 and imgs.ndim != 3:
        raise ValueError(f"3D imgs must be (D,H,W), got {imgs.shape}")
    spatial = imgs.shape[:2] if dims == 2 else imgs.shape
    if case.get("gts") is not None:
        gts = np.asarray(case["gts"])
        if gts.shape != spatial or not np.issubdtype(gts.dtype, np.integer):
            raise ValueError(f"gts must be an integer array of shape {spatial}, got {gts.dtype} {gts.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 2 * dims or len(boxes) == 0:
        raise ValueError(f"boxes must be (K,{2 * dims}) with K >= 1, got {boxes.shape}")
    lows, highs = boxes[:, :dims], boxes[:, dims:]
    upper = np.array(spatial[::-1]) - 1  # (W, H[, D]) - 1: boxes list x first
    if not np.isfinite(boxes).all() or (lows < 0).any() or (highs > upper).any() or (lows > highs).any():
        raise ValueError(
            f"boxes must satisfy 0 <= min <= max < size {tuple(upper + 1)} (x, y[, z]); got {boxes.tolist()}"
        )
    if dims == 3:
        spacing = np.asarray(case["spacing"], dtype=np.float64)
        if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise ValueError(f"spacing must be 3 positive numbers, got {case['spacing']!r}")


def save_boxprompt_case(
    path: str | Path, imgs: np.ndarray, gts: np.ndarray, boxes: np.ndarray, spacing: np.ndarray | None = None
) -> Path:
    """Validate and write one case as a compressed ``.npz``, atomically (temp file + rename).

    ``path`` must follow the naming convention (see :func:`case_filename`); ``gts`` is stored as
    uint8, or uint16 when its largest label exceeds 255. Raises ``ValueError`` naming the file.
    """
    path = Path(path)
    dims = dims_of(path)
    gts = np.asarray(gts)
    if gts.size and (gts.min() < 0 or gts.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{path.name}: gts labels must lie in 0..65535")
    gts = gts.astype(np.uint8 if gts.size == 0 or gts.max() < 256 else np.uint16)
    case = {"imgs": imgs, "gts": gts, "boxes": np.asarray(boxes, dtype=np.int64)}
    if spacing is not None:
        case["spacing"] = np.asarray(spacing, dtype=np.float64)
    try:
        _check_case(case, dims, require_gts=True)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from None
    # allow_pickle named (numpy's default) so that no key of case can be taken for it
    return atomic_write(path, lambda handle: np.savez_compressed(handle, allow_pickle=True, **case))


def _dims_from_arrays(case: dict) -> int:
    """2 or 3 for a case whose name lacks the ``{2,3}DBox_`` prefix: (H,W,3) images are 2D, (D,H,W) volumes 3D."""
    imgs = np.asarray(case.get("imgs"))
    return 2 if imgs.ndim == 3 and imgs.shape[2] == 3 and "spacing" not in case else 3


def read_boxprompt_case(path: str | Path, require_gts: bool = True) -> dict:
    """Load and validate one case.

    A name without a known modality (``2DBox_Histology_1.npz``, ``case_17.npz``) is still read, with modality
    None, so DAFT can route it to its general model; without the ``{2,3}DBox_`` prefix the dimensionality comes
    from the arrays.

    Returns:
        ``{"imgs", "boxes", "gts" (when present), "spacing" (3D), "modality": str | None, "dims": 2|3,
        "name": file name}``; arrays as stored.

    Raises:
        DataNotFoundError: the file does not exist.
        CorruptFileError: the file is not a readable ``.npz`` or breaks the convention; the message
            names the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"box-prompt case {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            case = {key: npz[key] for key in npz.files}
        dims = dims_of(path) if _CASE_NAME.match(path.name) else _dims_from_arrays(case)
        _check_case(case, dims, require_gts)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise CorruptFileError(f"{path.name}: {err}") from err  # name first: batch readers report by file name
    return {**case, "modality": modality_from_name(path), "dims": dims, "name": path.name}


# --- the model side: images into the IMAGE_SIZE frame and logits back (numpy) -----------------------------------

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
    """Boxes in original pixels -> boxes in the ``size`` frame, as the challenge code: ``int(box * size / max(H, W))``.

    Args:
        boxes: (4,) or (K, 4) [x_min, y_min, x_max, y_max] in original pixels.

    Returns:
        (K, 4) float32.
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
        raise ValueError(f"boxes must have shape (4,) or (K, 4) as [x_min, y_min, x_max, y_max], got {np.shape(boxes)}")
    if not np.isfinite(array).all() or (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
        raise ValueError(f"boxes must be finite with x_min <= x_max and y_min <= y_max, got {array.tolist()}")
    return np.trunc(array * (size / max(orig_hw))).astype(np.float32)


def postprocess_logits(low_res_logits: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """(K, 1, 256, 256) low-res logits -> (K, H, W) logits: crop the padding away, bilinear resize to (H, W)."""
    height, width = resized_hw(orig_hw, low_res_logits.shape[-1])
    cropped = np.moveaxis(low_res_logits[:, 0, :height, :width], 0, -1)  # (h, w, K)
    return np.moveaxis(resize(cropped, orig_hw, "bilinear"), -1, 0)

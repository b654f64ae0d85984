"""Box-prompt inference on MedSAM-on-Laptop cases, 2D and 3D, for any model with ``embed`` + ``predict_from_embedding``.

Numpy only (no torch import), so the same code runs the PyTorch models of the study and the deployed OpenVINO path.
A *predictor* is any object with

- ``embed(image) -> embedding``: ``image`` (H, W, 3) or (H, W) uint8, challenge preprocessing inside;
- ``predict_from_embedding(embedding, boxes, orig_hw) -> masks``: ``boxes`` (K, 4) xyxy in original pixels,
  ``masks`` (K, H, W) in {0, 1}.

:class:`mdbench.models.LiteMedSAM` (teacher and students) and
:class:`mdbench.papers.daft.deploy.runtime.OpenVinoSAM` are both.

2D (one image, K boxes): the image is embedded once, every box decoded against it, and box k writes label k+1
into a uint16 map in box order (later boxes overwrite earlier ones), as DAFT's inference does.

3D (``CVPR24_LiteMedSAM_infer.py``): for each box, the middle slice ``z_mid = z_min + (z_max - z_min) // 2`` is
segmented with the box's 2D part; moving up to ``z_max`` and then down to ``z_min``, each slice is prompted with
the bounding box of the previous slice's mask grown by 3 px (in the 256 frame), or with the original box when that
mask is empty. The baseline recomputes the embedding for every slice of every box; DAFT embeds each needed slice
once and reuses it across boxes (``cache_embeddings=True``), which gives the same masks for fewer encoder calls.
The baseline's downward loop stops one slice above ``z_min`` (``range(z_mid - 1, z_min, -1)``); here ``z_min`` is
included, as the box says it holds the object.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mdbench.data.boxprompt import modality_from_name

__all__ = ["CaseError", "Predictor", "SliceEmbeddings", "load_case", "segment_case", "PROPAGATION_SHIFT_256"]

PROPAGATION_SHIFT_256 = 3  # px added around the previous slice's mask, in the 256x256 frame (get_bbox256)
_DIMS = re.compile(r"^(?P<dims>[23])DBox_")


class CaseError(ValueError):
    """A case file that cannot be segmented (unreadable, missing key, box outside the image, ...)."""


class Predictor(Protocol):
    def embed(self, image: np.ndarray) -> Any: ...

    def predict_from_embedding(self, embedding: Any, boxes: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray: ...


def load_case(path: str | Path) -> dict[str, Any]:
    """Read one challenge ``.npz`` case for inference; ``gts`` may be absent (test inputs).

    Returns:
        ``{"imgs", "boxes", "gts" (if present), "spacing" (3D), "name", "dims": 2|3, "modality": str | None}``.

    Raises:
        CaseError: the file is missing or unreadable, lacks ``imgs``/``boxes`` (or ``spacing`` in 3D), or its
            boxes are not (K, 4) / (K, 6) inside the image; the message names the file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            case = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise CaseError(f"{path.name}: cannot read the case file: {err}") from err
    missing = [key for key in ("imgs", "boxes") if key not in case]
    if missing:
        raise CaseError(f"{path.name}: missing key(s) {missing}; a case needs 'imgs' and 'boxes'")
    boxes = np.asarray(case["boxes"])
    match = _DIMS.match(path.name)
    dims = int(match["dims"]) if match else (3 if boxes.ndim == 2 and boxes.shape[1] == 6 else 2)
    imgs = case["imgs"]
    spatial = imgs.shape[:2] if dims == 2 else imgs.shape
    if (dims == 2 and not (imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[2] in (1, 3)))) or (dims == 3 and imgs.ndim != 3):
        raise CaseError(f"{path.name}: {dims}D 'imgs' must be {'(H, W, 3)' if dims == 2 else '(D, H, W)'}, got {imgs.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 2 * dims or len(boxes) == 0:
        raise CaseError(f"{path.name}: 'boxes' must be (K, {2 * dims}) with K >= 1 for a {dims}D case, got {boxes.shape}")
    upper = np.array(spatial[::-1]) - 1  # boxes list x first: (W, H[, D]) - 1
    lows, highs = boxes[:, :dims], boxes[:, dims:]
    if not np.isfinite(boxes).all() or (lows < 0).any() or (highs > upper).any() or (lows > highs).any():
        raise CaseError(f"{path.name}: boxes must satisfy 0 <= min <= max < size {tuple(upper + 1)} (x, y[, z]); "
                        f"got {boxes.tolist()}")
    if dims == 3 and "spacing" not in case:
        raise CaseError(f"{path.name}: missing key 'spacing' (voxel size in mm) of a 3D case")
    if "gts" in case and case["gts"].shape != spatial:
        raise CaseError(f"{path.name}: 'gts' has shape {case['gts'].shape}, the image {spatial}")
    return {**case, "boxes": boxes, "name": path.name, "dims": dims, "modality": modality_from_name(path.name)}


class SliceEmbeddings:
    """Embeddings of a volume's slices, computed on demand; with ``cache`` each slice is embedded at most once.

    ``calls`` counts the encoder calls made (what the embedding cache saves).
    """

    def __init__(self, predictor: Predictor, volume: np.ndarray, cache: bool = True) -> None:
        self.predictor, self.volume, self.cache = predictor, volume, cache
        self._store: dict[int, Any] = {}
        self.calls = 0

    def __getitem__(self, z: int) -> Any:
        if z in self._store:
            return self._store[z]
        self.calls += 1
        embedding = self.predictor.embed(self.volume[z])
        if self.cache:
            self._store[z] = embedding
        return embedding


def _grown_bbox(mask: np.ndarray) -> np.ndarray | None:
    """Bounding box (4,) of a (H, W) mask grown by 3 px of the 256 frame, clipped to the image; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    height, width = mask.shape
    shift = PROPAGATION_SHIFT_256 * max(height, width) / 256
    return np.array([max(0.0, xs.min() - shift), max(0.0, ys.min() - shift),
                     min(width - 1.0, xs.max() + shift), min(height - 1.0, ys.max() + shift)])


def _segment_box_3d(predictor: Predictor, embeddings: SliceEmbeddings, box: np.ndarray, shape: tuple) -> np.ndarray:
    """(D, H, W) bool mask of one 3D box by slice propagation from the middle slice."""
    x_min, y_min, z_min, x_max, y_max, z_max = (int(v) for v in box)
    box_2d = np.array([x_min, y_min, x_max, y_max], dtype=np.float64)
    hw = tuple(shape[1:])
    mask = np.zeros(shape, dtype=bool)
    z_mid = z_min + (z_max - z_min) // 2
    for direction, stop in ((+1, z_max + 1), (-1, z_min - 1)):
        start = z_mid if direction > 0 else z_mid - 1
        for z in range(start, stop, direction):
            previous = _grown_bbox(mask[z - direction]) if z != z_mid else None
            prompt = box_2d if previous is None else previous
            mask[z] = predictor.predict_from_embedding(embeddings[z], prompt[None], hw)[0] > 0
    return mask


def segment_case(predictor: Predictor, case: dict[str, Any], cache_embeddings: bool = True) -> np.ndarray:
    """Label map of a case from :func:`load_case` (or ``read_boxprompt_case``).

    Args:
        predictor: see the module docstring.
        case: ``imgs`` and ``boxes`` (and ``dims``; inferred from the boxes when absent).
        cache_embeddings: 3D only; embed each slice once (DAFT) rather than once per box and slice (baseline).

    Returns:
        uint16 label map, (H, W) or (D, H, W): box k (0-based) writes label k + 1, in box order.
    """
    imgs, boxes = case["imgs"], np.asarray(case["boxes"])
    dims = case.get("dims") or (3 if boxes.shape[1] == 6 else 2)
    if dims == 2:
        hw = tuple(imgs.shape[:2])
        masks = predictor.predict_from_embedding(predictor.embed(imgs), boxes.astype(np.float64), hw)
        labels = np.zeros(hw, dtype=np.uint16)
        for k, mask in enumerate(masks, start=1):
            labels[mask > 0] = k
        return labels
    labels = np.zeros(imgs.shape, dtype=np.uint16)
    embeddings = SliceEmbeddings(predictor, imgs, cache=cache_embeddings)
    for k, box in enumerate(boxes, start=1):
        labels[_segment_box_3d(predictor, embeddings, box, imgs.shape)] = k
    return labels

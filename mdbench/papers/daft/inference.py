"""Box-prompt inference on MedSAM-on-Laptop cases, 2D and 3D, for any model with ``embed`` + ``predict_from_embedding``.

Numpy only (no torch import), so the same code runs the PyTorch models of the study and the deployed OpenVINO path.
Cases come from the one reader of the convention, :func:`mdbench.data.boxprompt.read_boxprompt_case`
(``require_gts=False`` for test inputs).

A *predictor* is any object with

- ``embed(image) -> embedding``: ``image`` (H, W, 3) or (H, W) uint8, challenge preprocessing inside;
- ``predict_from_embedding(embedding, boxes, orig_hw) -> masks``: ``boxes`` (K, 4) xyxy in original pixels,
  ``masks`` (K, H, W) in {0, 1};
- optionally ``embed_many(images) -> embeddings``: N images of one size at once, ``embeddings[i:i + 1]`` being
  image i's (what ``batch_slices`` uses).

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
included, as the box says it holds the object. With ``batch_slices`` (and the cache) every slice the boxes span is
embedded first, in batches, where the predictor has ``embed_many``: the same embeddings up to rounding, for a
fraction of the kernel launches, which bound a GPU at one slice a call.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

__all__ = ["PROPAGATION_SHIFT_256", "Predictor", "SliceEmbeddings", "segment_case"]

PROPAGATION_SHIFT_256 = 3  # px added around the previous slice's mask, in the 256x256 frame (get_bbox256)


class Predictor(Protocol):
    """A box-prompted segmenter as :func:`segment_case` uses it (see the module docstring)."""

    def embed(self, image: np.ndarray) -> Any: ...

    def predict_from_embedding(self, embedding: Any, boxes: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray: ...


class SliceEmbeddings:
    """Embeddings of a volume's slices, computed on demand; with ``cache`` each slice is embedded at most once.

    ``calls`` counts the encoder calls made (what the embedding cache saves).
    """

    def __init__(self, predictor: Predictor, volume: np.ndarray, cache: bool = True) -> None:
        self.predictor, self.volume, self.cache = predictor, volume, cache
        self._store: dict[int, Any] = {}
        self.calls = 0

    def prefetch(self, slices: Iterable[int]) -> None:
        """Embed the ``slices`` not yet cached in one ``embed_many`` call (nothing without the cache or the method)."""
        embed_many = getattr(self.predictor, "embed_many", None)
        missing = sorted(set(slices) - set(self._store))
        if not self.cache or embed_many is None or not missing:
            return
        embeddings = embed_many([self.volume[z] for z in missing])
        self.calls += len(missing)
        self._store.update({z: embeddings[i:i + 1] for i, z in enumerate(missing)})

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


def segment_case(predictor: Predictor, case: dict[str, Any], cache_embeddings: bool = True,
                 batch_slices: bool = False) -> np.ndarray:
    """Label map of a case read by :func:`mdbench.data.boxprompt.read_boxprompt_case`.

    Args:
        predictor: see the module docstring.
        case: ``imgs`` and ``boxes`` (and ``dims``; inferred from the boxes when absent).
        cache_embeddings: 3D only; embed each slice once (DAFT) rather than once per box and slice (baseline).
        batch_slices: 3D with the cache only; embed the slices the boxes span in batches first (module docstring).

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
    if batch_slices:
        embeddings.prefetch(z for box in boxes for z in range(max(0, int(box[2])), min(len(imgs), int(box[5]) + 1)))
    for k, box in enumerate(boxes, start=1):
        labels[_segment_box_3d(predictor, embeddings, box, imgs.shape)] = k
    return labels

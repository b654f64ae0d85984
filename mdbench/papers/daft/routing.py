"""Which fine-tuned expert segments a case: DAFT's file-name rule, or a router learned from the image.

Torch-free (numpy; scikit-learn only inside :class:`LearnedRouter`), so the deployed inference path can import it.

- :class:`FileNameRouter`: the paper's "PerfectMeta" oracle. The modality is read from the file name: first the
  ``{2,3}DBox_<Modality>`` prefix, then substring fall-backs tried in a fixed order where ``OCT`` comes before
  ``CT`` (``"OCT"`` contains ``"CT"``) and ``PET`` before ``CT``. Volumetric modalities share the ``"3D"`` expert
  (post-challenge ``main`` branch). Unknown names and modalities without an expert go to :data:`GENERAL`, logged.
- :class:`LearnedRouter`: the paper studied a learned meta-model (AutoGluon on meta-features) but did not publish
  it. Here: hand-made image meta-features (:func:`image_features`), a scikit-learn logistic regression over the
  experts it was trained on, and a local-outlier-factor novelty check; an image unlike every training image, or a
  low-confidence prediction, goes to :data:`GENERAL`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdbench.data.boxprompt import modality_from_name

if TYPE_CHECKING:  # scikit-learn is imported only when a LearnedRouter is fitted
    from sklearn.pipeline import Pipeline

__all__ = ["EXPERT_GROUPS", "GENERAL", "FileNameRouter", "LearnedRouter", "image_features"]

log = logging.getLogger(__name__)

GENERAL = "general"
# volumetric modalities share one expert, as in the post-challenge DAFT (datasplit/modalities3D.py: ^(CT|MR|PET))
EXPERT_GROUPS: Mapping[str, str] = {"CT": "3D", "MR": "3D", "PET": "3D"}

class FileNameRouter:
    """DAFT's oracle router: the expert for a case from its file name alone.

    Args:
        experts: names of the available experts (modalities such as ``"Endoscopy"``, group names such as ``"3D"``).
        groups: modality -> expert name for modalities that share an expert (default: CT/MR/PET -> ``"3D"``).
        default: the expert for everything else (the generally fine-tuned model).
    """

    def __init__(self, experts: Iterable[str], groups: Mapping[str, str] = EXPERT_GROUPS, default: str = GENERAL):
        self.experts = frozenset(experts)
        self.groups = dict(groups)
        self.default = default

    def expert_for_modality(self, modality: str | None) -> str:
        """The expert of a modality: its group's or its own when one exists, else the default."""
        if modality is None:
            return self.default
        expert = self.groups.get(modality, modality)
        return expert if expert in self.experts else self.default

    def route(self, filename: str | Path) -> str:
        """Expert name for a case file; unknown prefixes and modalities without an expert are logged."""
        modality = modality_from_name(filename)
        expert = self.expert_for_modality(modality)
        if modality is None:
            log.warning("%s: unknown modality prefix, routed to the %r model", Path(filename).name, expert)
        elif expert == self.default and modality not in self.experts:
            log.info("%s: no expert for modality %s, routed to the %r model", Path(filename).name, modality, expert)
        return expert


# --------------------------------------------------------------------------------------------- learned router

def _representative_slice(imgs: np.ndarray) -> tuple[np.ndarray, bool]:
    """(H, W, 3) float image in [0, 1] of a case and whether it is a volume (its middle slice, grey replicated)."""
    array = np.asarray(imgs)
    is_volume = array.ndim == 3 and array.shape[-1] != 3
    if is_volume:
        array = array[array.shape[0] // 2]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a (H, W, 3) image or a (D, H, W) volume, got shape {np.shape(imgs)}")
    scale = 255.0 if array.dtype == np.uint8 else max(float(array.max()), 1e-8)
    return array.astype(np.float32) / scale, is_volume


def image_features(imgs: np.ndarray, bins: int = 8) -> np.ndarray:
    """Meta-features of one case's image for the learned router (cheap: the image is subsampled to <= 64 px a side).

    Args:
        imgs: a 2D case's (H, W, 3) image or a 3D case's (D, H, W) volume (uint8, or float).

    Returns:
        float64 (12 + bins,): is-volume flag, log aspect ratio, log pixel count, per-channel mean (3) and std (3),
        colourfulness (mean |R-G| + |G-B|), near-black fraction, mean gradient magnitude, grey-level histogram
        (``bins`` fractions).
    """
    image, is_volume = _representative_slice(imgs)
    height, width = image.shape[:2]
    step = max(1, max(height, width) // 64)
    small = image[::step, ::step]
    grey = small.mean(axis=-1)
    gradient = np.hypot(*np.gradient(grey)) if min(grey.shape) > 1 else np.zeros_like(grey)
    histogram = np.histogram(grey, bins=bins, range=(0.0, 1.0))[0] / grey.size
    return np.concatenate([
        [float(is_volume), np.log(height / width), np.log(height * width)],
        small.mean(axis=(0, 1)), small.std(axis=(0, 1)),
        [np.abs(small[..., 0] - small[..., 1]).mean() + np.abs(small[..., 1] - small[..., 2]).mean(),
         float((grey < 0.02).mean()), float(gradient.mean())],
        histogram,
    ]).astype(np.float64)


class LearnedRouter:
    """Route a case to an expert from its image alone (see the module docstring).

    Args:
        min_confidence: below this top class probability the case goes to ``default``.
        novelty_neighbors: neighbours of the local-outlier-factor novelty check (capped at n_train - 1).
        default: the fallback expert.
    """

    def __init__(self, min_confidence: float = 0.5, novelty_neighbors: int = 10, default: str = GENERAL) -> None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence}")
        self.min_confidence = min_confidence
        self.novelty_neighbors = novelty_neighbors
        self.default = default
        self.classifier: Pipeline | None = None  # both set by fit
        self.novelty: Pipeline | None = None

    def fit(self, images: Sequence[np.ndarray], experts: Sequence[str]) -> LearnedRouter:
        """Train on case images and the expert each should go to (at least two experts, two images each)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import LocalOutlierFactor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        labels = np.asarray(experts)
        names, counts = np.unique(labels, return_counts=True)
        if len(images) != len(labels) or len(names) < 2 or counts.min() < 2:
            raise ValueError(
                f"the learned router needs >= 2 experts with >= 2 images each and one expert per image; "
                f"got {len(images)} images, counts {dict(zip(names.tolist(), counts.tolist(), strict=True))}"
            )
        features = np.stack([image_features(image) for image in images])
        self.classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(features, labels)
        neighbors = max(1, min(self.novelty_neighbors, len(features) - 1))
        self.novelty = make_pipeline(StandardScaler(), LocalOutlierFactor(n_neighbors=neighbors, novelty=True))
        self.novelty.fit(features)
        return self

    def route_many(self, images: Sequence[np.ndarray]) -> list[str]:
        """Expert per image: the classifier's choice, or ``default`` for novel or low-confidence images."""
        if self.classifier is None:
            raise RuntimeError("LearnedRouter.route called before fit")
        features = np.stack([image_features(image) for image in images])
        probabilities = self.classifier.predict_proba(features)
        assert self.novelty is not None  # fit sets it together with the classifier, checked above
        novel = self.novelty.predict(features) == -1
        choice = self.classifier.classes_[probabilities.argmax(axis=1)]
        confident = probabilities.max(axis=1) >= self.min_confidence
        return [str(c) if ok and not new else self.default for c, ok, new in zip(choice, confident, novel, strict=True)]

    def route(self, image: np.ndarray) -> str:
        """Expert for one case image."""
        return self.route_many([image])[0]

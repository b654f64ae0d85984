"""Metrics of the suite: classification (scikit-learn), segmentation (MONAI) and confidence intervals (SciPy).

Segmentation rule used by every function here, so that tables agree:

- a class absent from both the prediction and the target of a case gives ``nan`` (not counted);
- a class present in only one of them gives Dice 0 and NSD 0, and HD95 ``nan`` (the distance to an
  empty set is undefined; MONAI's own result there is nan or inf depending on the case).

``nan`` entries are dropped and counted by :func:`mean_std_ci` (``n_nan``), so a table can say how many
cases a mean left out.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot
from scipy import stats
from scipy.special import expit, softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

ArrayLike = np.ndarray | torch.Tensor | Sequence

# The MedSAM-on-Laptop challenge (evaluation/compute_metrics.py) sets NSD to 0 when the case DSC is <= this.
CHALLENGE_MIN_DSC_FOR_NSD = 0.2


# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------
def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _probabilities(scores: np.ndarray, scores_are: str) -> np.ndarray:
    """(N,) or (N, C) scores -> (N, C) class probabilities."""
    if scores_are not in ("probs", "logits"):
        raise ValueError(f"scores_are must be 'probs' or 'logits', got {scores_are!r}")
    if scores.ndim == 1:  # binary, one score per sample: the positive class
        pos = expit(scores) if scores_are == "logits" else scores
        if scores_are == "probs" and (pos.min() < 0 or pos.max() > 1):
            raise ValueError("binary scores given as 'probs' lie outside [0, 1]; pass scores_are='logits'")
        return np.stack([1 - pos, pos], axis=1)
    if scores_are == "logits":
        return softmax(scores, axis=1)
    if scores.min() < 0 or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("scores given as 'probs' have rows that do not sum to 1; pass scores_are='logits'")
    return scores


def classification_metrics(
    y_true: ArrayLike,
    scores: ArrayLike,
    num_classes: int | None = None,
    scores_are: Literal["probs", "logits"] = "probs",
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro AUC and macro F1 of one classifier's outputs.

    Args:
        y_true: (N,) integer labels in ``[0, num_classes)``.
        scores: (N, C) class probabilities (rows sum to 1) or logits, as ``scores_are`` says; for a binary
            task also (N,) positive-class probabilities or logits.
        num_classes: C; defaults to ``scores.shape[1]`` (2 for (N,) scores).
        scores_are: ``"probs"`` or ``"logits"`` (logits are softmaxed, or passed through a sigmoid for (N,)).

    Returns:
        ``{"accuracy", "balanced_accuracy", "auc", "f1_macro"}``. Predictions are the argmax class. ``auc`` is
        ``roc_auc_score`` of the positive-class probability for C = 2, and the one-vs-rest macro mean for
        C > 2; it is ``nan`` (with a warning) when a class is absent from ``y_true``, where AUC is undefined.
    """
    y = _to_numpy(y_true).astype(np.int64, copy=False)
    probs = _probabilities(_to_numpy(scores).astype(np.float64), scores_are)
    if y.ndim != 1 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"y_true must be (N,) and scores (N, C); got {y.shape} and {probs.shape}")
    if y.size == 0:
        raise ValueError("classification_metrics got no samples (y_true is empty)")
    n_cls = probs.shape[1] if num_classes is None else num_classes
    if probs.shape[1] != n_cls:
        raise ValueError(f"scores have {probs.shape[1]} columns but num_classes={n_cls}")
    if y.min() < 0 or y.max() >= n_cls:
        raise ValueError(f"y_true holds labels outside [0, {n_cls}): min {y.min()}, max {y.max()}")

    missing = sorted(set(range(n_cls)) - set(np.unique(y).tolist()))
    if missing:
        warnings.warn(f"classes {missing} are absent from y_true: AUC is undefined, reported as nan", stacklevel=2)
        auc = math.nan
    elif n_cls == 2:
        auc = float(roc_auc_score(y, probs[:, 1]))
    else:
        auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_cls))))

    y_pred = probs.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, y_pred)),
        "auc": auc,
        "f1_macro": float(f1_score(y, y_pred, average="macro", zero_division=0)),
    }


# --------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike) -> torch.Tensor:
    """CPU tensor of ``x``; unsigned label maps (the challenge's uint16) widen to int64, which every op supports."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.long() if t.dtype in (torch.uint16, torch.uint32, torch.uint64) else t


def _one_hot_pair(pred: ArrayLike, target: ArrayLike, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, *spatial) integer label maps -> two (B, num_classes, *spatial) float one-hot tensors."""
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    if p.ndim not in (3, 4):
        raise ValueError(f"expected (B, H, W) or (B, H, W, D) label maps, got shape {tuple(p.shape)}")
    if p.is_floating_point() or t.is_floating_point():
        raise ValueError("pred and target must be integer (or bool) label maps, not floats; argmax/threshold first")
    for name, x in (("pred", p), ("target", t)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes}): {int(x.min())}..{int(x.max())}")
    p, t = p.long(), t.long()
    return one_hot(p.unsqueeze(1), num_classes, dim=1), one_hot(t.unsqueeze(1), num_classes, dim=1)


def _presence(pred_oh: torch.Tensor, target_oh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) masks: class present in the prediction, class present in the target."""
    dims = tuple(range(2, pred_oh.ndim))
    return pred_oh.sum(dims) > 0, target_oh.sum(dims) > 0


@contextlib.contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI warns per empty class; the module docstring's rule handles those cases, so silence the noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is all 0.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        yield


def dice_per_class(
    pred: ArrayLike, target: ArrayLike, num_classes: int, include_background: bool = False
) -> torch.Tensor:
    """Dice per case and class (MONAI ``compute_dice``).

    Args:
        pred, target: (B, H, W) or (B, H, W, D) integer label maps with values in ``[0, num_classes)``.
        num_classes: number of labels, background (0) included.
        include_background: keep class 0 in the output.

    Returns:
        (B, C) float tensor, C = ``num_classes`` (or ``num_classes - 1`` without background); ``nan`` where
        the class is absent from both pred and target, 0 where it is in only one.
    """
    p, t = _one_hot_pair(pred, target, num_classes)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)
    in_p, in_t = _presence(p, t)
    dice[~in_p & ~in_t] = math.nan
    return dice if include_background else dice[:, 1:]


def hd95(
    pred: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per case and foreground class (MONAI).

    Args:
        pred, target: (B, H, W) or (B, H, W, D) integer label maps.
        num_classes: number of labels, background (0) included.
        spacing: pixel/voxel size per spatial axis (one number = isotropic); ``None`` = 1, i.e. in pixels.

    Returns:
        (B, num_classes - 1) float tensor in the units of ``spacing``; ``nan`` where pred or target lacks
        the class (undefined distance).
    """
    p, t = _one_hot_pair(pred, target, num_classes)
    with _quiet_monai():
        hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=spacing).float()
    in_p, in_t = _presence(p, t)
    hd[~(in_p & in_t)[:, 1:]] = math.nan
    return hd


def nsd(
    pred: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    tolerance: float = 2.0,
    spacing: float | Sequence[float] | None = None,
    use_subvoxels: bool = False,
) -> torch.Tensor:
    """Normalized surface Dice per case and foreground class (MONAI ``compute_surface_dice``).

    Args:
        pred, target: (B, H, W) or (B, H, W, D) integer label maps.
        num_classes: number of labels, background (0) included.
        tolerance: boundary tolerance in the units of ``spacing`` (pixels when ``spacing`` is None).
        spacing: pixel/voxel size per spatial axis (one number = isotropic); ``None`` = 1.
        use_subvoxels: weigh boundary elements by their area as DeepMind's ``surface-distance`` (and so the
            MedSAM-on-Laptop challenge) does; the default counts boundary pixels.

    Returns:
        (B, num_classes - 1) float tensor in [0, 1]; ``nan`` where the class is absent from both, 0 where it
        is in only one.
    """
    p, t = _one_hot_pair(pred, target, num_classes)
    with _quiet_monai():
        return compute_surface_dice(
            p, t, class_thresholds=[float(tolerance)] * (num_classes - 1), spacing=spacing, use_subvoxels=use_subvoxels
        )


def dsc_nsd_challenge(
    pred: ArrayLike,
    gt: ArrayLike,
    spacing: Sequence[float] | None = None,
    tolerance: float = 2.0,
) -> dict[str, float]:
    """DSC and NSD of one case by the MedSAM-on-Laptop challenge rule (``evaluation/compute_metrics.py``).

    DSC is the mean binary Dice over label ids ``1..max(gt)``; NSD (tolerance 2, boundary elements weighted
    by area like the challenge's DeepMind ``SurfaceDice``) is the mean over the same ids, and is set to 0
    when the case DSC is <= 0.2. A 2D case is evaluated as the challenge does: as a one-slice volume
    (trailing axis of size 1) with spacing 1 (pixels) unless ``spacing`` is given.

    The one deviation: a label id in ``1..max(gt)`` absent from both pred and gt is skipped (the challenge
    would turn the whole case into nan). A gt without foreground gives ``nan`` for both, with a warning.

    Args:
        pred, gt: (H, W) or (D, H, W) integer label maps of one case (same shape).
        spacing: voxel size in mm per axis of the arrays; required for 3D, optional for 2D (default 1).
        tolerance: NSD tolerance in mm (3D) or pixels (2D).

    Returns:
        ``{"dsc": float, "nsd": float}``.
    """
    p, g = _as_tensor(pred), _as_tensor(gt)
    if p.shape != g.shape or p.ndim not in (2, 3):
        raise ValueError(f"pred and gt must share a (H, W) or (D, H, W) shape; got {tuple(p.shape)}, {tuple(g.shape)}")
    if p.ndim == 3 and spacing is None:
        raise ValueError("a 3D case needs its voxel spacing (mm), as the challenge reads it from the npz")
    n_labels = int(g.max())
    if n_labels < 1:
        warnings.warn("gt has no foreground label: the case's DSC and NSD are undefined (nan)", stacklevel=2)
        return {"dsc": math.nan, "nsd": math.nan}
    if p.ndim == 2:  # the challenge's np.expand_dims(-1) with spacing [1, 1, 1]
        p, g = p[..., None], g[..., None]
        spacing = [*(spacing if spacing is not None else (1.0, 1.0)), 1.0]
    assert spacing is not None  # a 3D case without spacing was refused above, a 2D one got it just now
    if len(spacing) != 3:
        raise ValueError(f"spacing must give one value per axis, got {spacing}")
    p = torch.where(p > n_labels, 0, p)  # labels above max(gt) are never scored by the challenge

    dsc_per_label = dice_per_class(p[None], g[None], n_labels + 1)[0]
    keep = ~torch.isnan(dsc_per_label)
    dsc = float(dsc_per_label[keep].mean())
    if dsc <= CHALLENGE_MIN_DSC_FOR_NSD:
        return {"dsc": dsc, "nsd": 0.0}
    nsd_per_label = nsd(p[None], g[None], n_labels + 1, tolerance, spacing=list(spacing), use_subvoxels=True)[0]
    return {"dsc": dsc, "nsd": float(nsd_per_label[keep].mean())}


# --------------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------------
def mean_std_ci(values: ArrayLike, confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1) and Student-t confidence interval of per-seed or per-case values.

    ``nan`` values are dropped and counted in ``n_nan``; ``n`` counts the values used. For n = 1, std is 0 and
    the interval is ``nan`` (undefined from one value).

    Returns:
        ``{"mean", "std", "n", "n_nan", "ci_low", "ci_high"}``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = _to_numpy(values).astype(np.float64).ravel()
    nan = np.isnan(x)
    x = x[~nan]
    n = int(x.size)
    if n == 0:
        raise ValueError(f"mean_std_ci got no non-nan values ({int(nan.sum())} nan)")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    if n == 1:
        low = high = math.nan
    elif std == 0.0:
        low = high = mean
    else:
        low, high = (float(v) for v in stats.t.interval(confidence, df=n - 1, loc=mean, scale=std / math.sqrt(n)))
    return {"mean": mean, "std": std, "n": n, "n_nan": int(nan.sum()), "ci_low": low, "ci_high": high}

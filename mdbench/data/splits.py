"""Deterministic split definitions shared by the loaders (public so data cards and tests can show them).

A dataset without an official split is cut with :func:`split_indices`: scikit-learn's
``train_test_split``, first test off the whole, then val off the rest (each ceil(n * fraction)
cases), stratified by label where labels exist, seed 0 and 70/15/15 by default. Inputs are case
lists sorted by file name, so the same files and seed always give the same split.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = 0


def split_indices(
    n: int,
    labels: Sequence[int] | np.ndarray | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """Seeded (stratified when ``labels`` is given) train/val/test split of ``range(n)``.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``: sorted, disjoint int64 arrays covering ``range(n)``.
    """
    fractions = _check_fractions(fractions)
    y = None if labels is None else np.asarray(labels)
    if y is not None and len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} cases")
    idx = np.arange(n)
    _, val_frac, test_frac = fractions
    rest, test = _cut(idx, y, _count(n, test_frac), seed)
    train, val = _cut(rest, None if y is None else y[rest], _count(n, val_frac), seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def kfold_splits(
    labels: Sequence[int] | np.ndarray, k: int = 5, seed: int = DEFAULT_SEED
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified k-fold over cases with ``labels``: ``[(train_idx, test_idx), ...]``, one per fold."""
    y = np.asarray(labels)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    return [(np.sort(tr), np.sort(te)) for tr, te in folds]


def check_split(split: str, allowed: Sequence[str] = SPLITS + ("all",)) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise ``ValueError`` listing them."""
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(allowed)}")
    return split


def _count(n: int, frac: float) -> int:
    """Cases a fraction takes: rounded up like scikit-learn, minus float noise (0.15 * 200 is 30, not 31)."""
    return math.ceil(n * frac - 1e-9)


def _cut(idx: np.ndarray, y: np.ndarray | None, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if count == 0:
        return idx, idx[:0]
    try:
        keep, cut = train_test_split(idx, test_size=count, random_state=seed, stratify=y)
    except ValueError as err:  # e.g. fewer cases than classes cannot be stratified
        raise ValueError(f"cannot cut {count} of {len(idx)} cases: {err}") from err
    return keep, cut


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be (train, val, test) >= 0 with train > 0 summing to 1, "
                         f"got {fractions}")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]

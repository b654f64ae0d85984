"""Per-sample outputs behind a record: what each seed's number was aggregated from, kept so that it can be
re-analysed (paired tests, bootstraps, a new metric) without retraining.

One file per (table, dataset, row) beside the records, ``<table>__<dataset>__<row>.samples.csv.gz``, one line per
(seed, unit); ``unit`` is the test case, image, bag or volume the line belongs to (paired claims match units of
two rows within a seed). Two kinds of lines:

- **per-unit metric values**: columns ``seed, unit, metric, value`` and optionally ``weight``; a record's value
  for a seed is the (weighted) mean of its metric's values (Dice per volume, DSC per case, with weights
  ``1 / (modalities × cases of the modality)`` for a macro average over modalities), or their median (aggregate
  ``median``: wall-clock times, one unit per timed repeat, ``rep00``, ``rep01``, …; see :func:`repeat_units`);
- **classifier outputs**: columns ``seed, unit, label, prob_0 … prob_{C-1}`` (class probabilities); a record of
  metric ``accuracy``, ``balanced_accuracy``, ``auc`` or ``f1_macro`` is :func:`mdbench.metrics.
  classification_metrics` of a seed's lines, times ``scale`` (100 for percent).

A record points to its file with ``{"file", "aggregate", "scale"}``; :func:`check_reproduces` insists that the
file gives back each seed's value, so a table never rests on outputs that do not add up to it.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SUFFIX = ".samples.csv.gz"
# aggregates of a value per unit: the mean (a paired difference is a mean of per-unit differences) and the median
# (timing repeats, robust to the odd call the machine's load slowed down)
MEAN, MEDIAN = "mean", "median"
PER_UNIT = (MEAN, MEDIAN)
CLASSIFICATION = ("accuracy", "balanced_accuracy", "auc", "f1_macro")
AGGREGATES = (*PER_UNIT, *CLASSIFICATION)
_REL_TOL = 1e-9


class SamplesError(ValueError):
    """Per-sample outputs that are malformed or do not reproduce their record's values."""


@dataclass(frozen=True)
class SamplesRef:
    """Where a record's per-sample outputs are (a file name in its records folder) and how they aggregate."""

    file: str
    aggregate: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise SamplesError(f"unknown aggregate {self.aggregate!r}; use one of {list(AGGREGATES)}")

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "aggregate": self.aggregate, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplesRef | None:
        return None if data is None else cls(str(data["file"]), str(data["aggregate"]), float(data.get("scale", 1)))


def prob_columns(frame: pd.DataFrame) -> list[str]:
    """The ``prob_<k>`` columns of a classifier-output frame, in class order."""
    cols = [c for c in frame.columns if str(c).startswith("prob_")]
    return sorted(cols, key=lambda c: int(str(c)[5:]))


def classifier_frame(seed: int, units: Sequence[Any], labels: Sequence[int] | np.ndarray,
                     probs: np.ndarray) -> pd.DataFrame:
    """Lines ``seed, unit, label, prob_0 …`` for one seed's classifier outputs; ``probs``: (N, C) probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] != len(labels) or len(units) != len(labels):
        raise SamplesError(f"classifier outputs need N units, (N,) labels and (N, C) probabilities; got "
                           f"{len(units)}, {labels.shape} and {probs.shape}")
    frame = pd.DataFrame({"seed": int(seed), "unit": [str(u) for u in units], "label": labels.astype(np.int64)})
    return pd.concat([frame, pd.DataFrame(probs, columns=[f"prob_{k}" for k in range(probs.shape[1])])], axis=1)


def repeat_units(repeats: int) -> list[str]:
    """The unit ids of ``repeats`` timed repeats, ``rep00``, ``rep01``, …: repeat r of every row timed in one run
    shares its id, so that claims pair them."""
    return [f"rep{r:02d}" for r in range(repeats)]


def aggregate(lines: pd.DataFrame, ref: SamplesRef, metric: str) -> float:
    """One seed's value of ``metric`` from its lines (all of one seed)."""
    if ref.aggregate in PER_UNIT:
        own = lines[lines["metric"] == metric]
        if own.empty:
            raise SamplesError(f"no per-unit values of metric {metric!r}")
        values = own["value"].to_numpy(float)
        if ref.aggregate == MEDIAN:
            if "weight" in own and own["weight"].nunique() > 1:
                raise SamplesError(f"{metric}: a median of per-unit values takes no weights")
            return float(np.median(values)) * ref.scale
        weights = own["weight"].to_numpy(float) if "weight" in own else np.ones(len(own))
        return float(np.sum(weights * values) / np.sum(weights)) * ref.scale
    from mdbench import metrics  # torch and MONAI come with it: only where classifier outputs are aggregated

    probs = lines[prob_columns(lines)].to_numpy(np.float64)
    return metrics.classification_metrics(lines["label"].to_numpy(), probs)[ref.aggregate] * ref.scale


def count_units(frame: pd.DataFrame, ref: SamplesRef, metric: str, seeds: Sequence[int]) -> int:
    """How many distinct units (test cases, images, bags, timing repeats) the record of ``metric`` over ``seeds``
    rests on, of its per-sample outputs ``frame``."""
    lines = frame[frame["seed"].isin(seeds)]
    if ref.aggregate in PER_UNIT:
        lines = lines[lines["metric"] == metric]
    return int(lines["unit"].nunique())


def validate(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with checked columns and types, or a :class:`SamplesError` naming what is wrong."""
    missing = {"seed", "unit"} - set(frame.columns)
    is_values = "value" in frame.columns
    if is_values:
        missing |= {"metric"} - set(frame.columns)
    elif "label" not in frame.columns or not prob_columns(frame):
        raise SamplesError("per-sample outputs need columns seed, unit and either metric, value (per-unit metric "
                           f"values) or label, prob_0 … (classifier outputs); got {list(frame.columns)}")
    if missing:
        raise SamplesError(f"per-sample outputs miss columns {sorted(missing)}")
    frame = frame.assign(seed=frame["seed"].astype(np.int64), unit=frame["unit"].astype(str))
    numeric = ["value", *(["weight"] if "weight" in frame else [])] if is_values else prob_columns(frame)
    if not np.isfinite(frame[numeric].to_numpy(np.float64)).all():
        raise SamplesError(f"per-sample outputs hold non-finite values in {numeric}")
    keys = ["seed", "unit", "metric"] if is_values else ["seed", "unit"]
    if frame.duplicated(keys).any():
        raise SamplesError(f"per-sample outputs repeat a ({', '.join(keys)}) line")
    return frame


def check_reproduces(frame: pd.DataFrame, ref: SamplesRef, metric: str, seeds: Sequence[int],
                     values: Sequence[float]) -> None:
    """Raise :class:`SamplesError` unless each seed's lines aggregate to that seed's recorded value."""
    for seed, value in zip(seeds, values, strict=True):
        lines = frame[frame["seed"] == seed]
        if lines.empty:
            raise SamplesError(f"{metric}: no per-sample lines for seed {seed}")
        got = aggregate(lines, ref, metric)
        if not math.isclose(got, value, rel_tol=_REL_TOL, abs_tol=1e-9 * max(1.0, abs(ref.scale))):
            raise SamplesError(f"{metric}, seed {seed}: per-sample outputs give {got!r}, the record says {value!r}")


def to_bytes(frame: pd.DataFrame) -> bytes:
    """Gzipped CSV with a fixed gzip timestamp, so that the same outputs give the same bytes."""
    buffer = io.BytesIO()
    frame.to_csv(buffer, index=False, compression={"method": "gzip", "mtime": 0})
    return buffer.getvalue()


def read(path: Path) -> pd.DataFrame:
    """The per-sample outputs in ``path``; a missing or unreadable file is an error saying how to remake it."""
    try:
        frame = pd.read_csv(path, compression="gzip", dtype={"unit": str})
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as err:
        raise SamplesError(f"cannot read per-sample outputs {path}: {err}. Delete the row's records and rerun the "
                           "notebook to remake them.") from err
    return validate(frame)

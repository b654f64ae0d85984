"""DSC and NSD of one case with the MedSAM-on-Laptop challenge rule (the per-case score of DAFT's Table A), their
leaderboard averages (the mean over cases per modality, then the mean over modalities) and the per-case lines those
averages are weighted means of.

A frame of per-case scores (:class:`mdbench.papers.daft.experiment.CaseEvaluator`) has columns ``case``,
``modality``, ``dsc``, ``nsd`` and ``error`` (empty where the case was scored).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mdbench.metrics import dsc_nsd_challenge

__all__ = ["AVERAGE", "case_lines", "modality_summary", "score_case", "summary_metrics"]

AVERAGE = "average"


def score_case(labels: np.ndarray, case: dict) -> dict[str, float]:
    """``{"dsc", "nsd"}`` in percent of a predicted label map against the case's ``gts`` (challenge rule).

    Raises:
        ValueError: the case has no ``gts`` or an empty one (its scores are undefined).
    """
    if "gts" not in case:
        raise ValueError(f"{case['name']}: no ground truth ('gts') to score against")
    if not np.asarray(case["gts"]).any():
        raise ValueError(f"{case['name']}: empty ground truth (no labelled pixel), DSC and NSD undefined")
    spacing = list(np.asarray(case["spacing"], dtype=float)) if case["dims"] == 3 else None
    # int32: torch has no comparison kernels for uint16 label maps
    scores = dsc_nsd_challenge(labels.astype(np.int32), np.asarray(case["gts"]).astype(np.int32), spacing=spacing)
    return {name: 100.0 * value for name, value in scores.items()}


def modality_summary(frame: pd.DataFrame, metrics: Sequence[str] = ("dsc", "nsd")) -> pd.DataFrame:
    """Mean of each metric per modality over the scored cases, plus the :data:`AVERAGE` row (mean over modalities);
    a nan score is left out of its modality's mean, a modality without any score out of the average.

    Returns:
        DataFrame indexed by modality (then ``average``) with the metric columns and ``n`` (scored cases).
    """
    scored = frame[frame["error"] == ""]
    if scored.empty:
        raise ValueError("no scored case to summarise (every case has an error)")
    per_modality = scored.groupby("modality")[list(metrics)].mean()
    per_modality["n"] = scored.groupby("modality").size()
    average = per_modality[list(metrics)].mean().to_frame(AVERAGE).T
    average["n"] = int(per_modality["n"].sum())
    return pd.concat([per_modality, average])


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """Flat ``{"<metric>_<modality>": value}`` of a :func:`modality_summary` (``dsc_Endoscopy``, ``nsd_average``)."""
    return {f"{metric}_{modality}": float(value)
            for modality, row in summary.drop(columns="n").iterrows() for metric, value in row.items()}


def case_lines(frame: pd.DataFrame, metrics: Sequence[str] = ("dsc", "nsd")) -> pd.DataFrame:
    """The per-case lines that each of :func:`summary_metrics` is the weighted mean of (:mod:`mdbench.samples`).

    Per scored case and metric with a score (nan scores are skipped, as :func:`modality_summary` skips them): a
    line ``<metric>_<modality>`` of weight 1 and a line ``<metric>_average`` of weight
    ``1 / (modalities with a score × cases with a score of the case's modality)``.

    Returns:
        DataFrame with columns ``unit`` (the case name), ``metric``, ``value`` and ``weight``.
    """
    scored = frame[frame["error"] == ""]
    lines = []
    for metric in metrics:
        valid = scored[scored[metric].notna()]
        cases, modality, value = (valid[c].to_numpy() for c in ("case", "modality", metric))
        in_modality = valid.groupby("modality")[metric].transform("size").to_numpy(float)
        lines += [pd.DataFrame({"unit": cases, "metric": [f"{metric}_{m}" for m in modality], "value": value,
                                "weight": 1.0}),
                  pd.DataFrame({"unit": cases, "metric": f"{metric}_{AVERAGE}", "value": value,
                                "weight": 1.0 / (len(set(modality)) * in_modality)})]
    return pd.concat(lines, ignore_index=True).astype({"value": float})

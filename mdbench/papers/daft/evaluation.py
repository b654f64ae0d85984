"""Score models and routers on challenge cases: DSC and NSD per case (challenge rule), per modality, averaged.

:class:`CaseEvaluator` segments each (model, case) pair once and reuses it for every row of Table A that routes
that case to that model (e.g. DAFT sends an unseen modality to the general model, whose masks are already known).
A case that cannot be segmented or scored is reported in the ``error`` column and the batch goes on (unreadable
files are skipped before, by :func:`mdbench.papers.daft.cases.read_cases`).

Averages follow the challenge leaderboard: the mean over cases per modality, then the mean over modalities.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from mdbench.metrics import dsc_nsd_challenge
from mdbench.papers.daft.inference import Predictor, segment_case

__all__ = ["AVERAGE", "CaseEvaluator", "modality_summary", "score_case", "summary_metrics"]

log = logging.getLogger(__name__)
AVERAGE = "average"
COLUMNS = ["case", "modality", "model", "dsc", "nsd", "seconds", "error"]


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI warns about labels absent from a prediction
        # int32: torch has no comparison kernels for uint16 label maps
        scores = dsc_nsd_challenge(labels.astype(np.int32), np.asarray(case["gts"]).astype(np.int32), spacing=spacing)
    return {name: 100.0 * value for name, value in scores.items()}


class CaseEvaluator:
    """Segment and score cases with named models, each (model, case) pair once.

    Args:
        models: model name -> predictor (see :mod:`mdbench.papers.daft.inference`).
        cache_embeddings: embed each 3D slice once (same masks as without, fewer encoder calls).
    """

    def __init__(self, models: Mapping[str, Predictor], cache_embeddings: bool = True) -> None:
        self.models = dict(models)
        self.cache_embeddings = cache_embeddings
        self._rows: dict[tuple[str, str], dict] = {}
        self.predictions: dict[tuple[str, str], np.ndarray] = {}

    def _row(self, model: str, case: dict) -> dict:
        key = (model, case["name"])
        if key not in self._rows:
            row = {"case": case["name"], "modality": case.get("modality") or "unknown", "model": model,
                   "dsc": np.nan, "nsd": np.nan, "seconds": np.nan, "error": ""}
            try:
                start = time.perf_counter()
                labels = segment_case(self.models[model], case, self.cache_embeddings)
                row["seconds"] = time.perf_counter() - start
                self.predictions[key] = labels
                row.update(score_case(labels, case))
            except ValueError as err:  # an unscorable case is reported in its row
                row["error"] = str(err)
                log.warning("case %s with model %s: %s", case["name"], model, err)
            self._rows[key] = row
        return self._rows[key]

    def evaluate(self, cases: Sequence[dict], route: Callable[[dict], str] | str,
                 progress: bool = False) -> pd.DataFrame:
        """One row per case: the model ``route(case)`` picks (or the one named), its DSC, NSD (%), seconds, error."""
        from tqdm.auto import tqdm

        choose = (lambda case: route) if isinstance(route, str) else route
        rows = []
        for case in tqdm(cases, desc="cases", disable=not progress, leave=False):
            model = choose(case)
            if model not in self.models:
                raise KeyError(f"router chose model {model!r} for {case['name']}; known: {sorted(self.models)}")
            rows.append(self._row(model, case))
        return pd.DataFrame(rows, columns=COLUMNS)


def modality_summary(frame: pd.DataFrame, metrics: Sequence[str] = ("dsc", "nsd")) -> pd.DataFrame:
    """Mean of each metric per modality over the scored cases, plus the :data:`AVERAGE` row (mean over modalities).

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

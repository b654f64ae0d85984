"""DAFT experiment glue: Table A, every row's models run on the test cases with their routes, and averaged.

The notebook wires DAFT's helpers together: :mod:`~mdbench.papers.daft.cases` (case folders), :mod:`~.training`
(KD, general fine-tuning, data-aware fine-tuning), :mod:`~.routing` (file-name and learned routers),
:mod:`~.inference` (2D / 3D box-prompt segmentation), :mod:`~.evaluation` (the per-case challenge score) and
:mod:`~.deploy` (export, runtime, fresh-process timing).

:class:`CaseEvaluator` segments each (model, case) pair once and reuses it for every row of Table A that routes
that case to that model (e.g. DAFT sends an unseen modality to the general model, whose masks are already known).
A case that cannot be segmented or scored is reported in the ``error`` column and the batch goes on (unreadable
files are skipped before, by :func:`mdbench.papers.daft.cases.read_cases`).

Averages follow the challenge leaderboard (:func:`modality_summary`): the mean over cases per modality, then the
mean over modalities.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from mdbench.papers.daft.evaluation import score_case
from mdbench.papers.daft.inference import Predictor, segment_case

__all__ = ["AVERAGE", "CaseEvaluator", "modality_summary", "summary_metrics"]

log = logging.getLogger(__name__)
AVERAGE = "average"
COLUMNS = ["case", "modality", "model", "dsc", "nsd", "seconds", "error"]


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

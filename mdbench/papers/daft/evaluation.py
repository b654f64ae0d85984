"""DSC and NSD of one case with the MedSAM-on-Laptop challenge rule (the per-case score of DAFT's Table A)."""
from __future__ import annotations

import warnings

import numpy as np

from mdbench.metrics import dsc_nsd_challenge

__all__ = ["score_case"]


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

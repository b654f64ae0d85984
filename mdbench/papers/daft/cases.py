"""Case folders for DAFT: real datasets converted to challenge ``.npz`` cases, per-modality splits, tolerant reading.

- :func:`write_real_cases`: the suite's one converter of real datasets into MedSAM-on-Laptop cases (Kvasir-SEG ->
  Endoscopy, ISIC 2017 -> Dermoscopy, HC18 -> US, MSD hippocampus -> 3D MR), under ``<out>/<split>/``, using each
  loader's fixed seeded split. 2D: images x255 to uint8; each connected component of the mask with at least
  :data:`MIN_OBJECT_PIXELS` pixels is one object (largest first, one box each, as in the challenge data). 3D: the
  volume min-max scaled to 0..255 (per volume, no percentile clipping: the model's own input normalisation is
  min-max); its two labels (anterior, posterior) are the objects, numbered 1..K so box k belongs to label k+1. The
  rule and its reasons: ``data_cards/synthetic_boxprompt.md``.
- :func:`case_splits`: train/val/test lists of any folder of challenge ``.npz`` files: its ``train/``, ``val/``,
  ``test/`` sub-folders when present, else a seeded split inside every modality (DAFT's ``split_dataset.py`` split
  80/20 inside every dataset folder with seed 2024; here val and test are cut the same way).
- :func:`read_cases`: read many cases, logging and skipping the bad ones, so one broken file never stops a batch.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
from scipy import ndimage

from mdbench.data.boxprompt import (
    boxes_from_labels,
    case_filename,
    modality_from_name,
    read_boxprompt_case,
    relabel_instances,
    save_boxprompt_case,
)
from mdbench.data.errors import DataError
from mdbench.data.registry import load_dataset
from mdbench.data.splits import SPLITS, split_indices

__all__ = ["MIN_OBJECT_PIXELS", "REAL_SOURCES", "case_splits", "cases_checksum", "read_cases", "write_real_cases"]

log = logging.getLogger(__name__)

# 2D components smaller than this are dropped: specks of a mask, not objects to prompt a box for
MIN_OBJECT_PIXELS = 20

# case kind -> (registered dataset, loader keyword arguments); "minmax" is the 3D intensity rule (see the docstring)
REAL_SOURCES: Mapping[str, tuple[str, dict[str, Any]]] = {
    "2DBox_Endoscopy": ("kvasir_seg", {"foreground_only": True}),
    "2DBox_Dermoscopy": ("isic2017", {"task": "segmentation", "foreground_only": True}),
    "2DBox_US": ("hc18", {"foreground_only": True}),
    "3DBox_MR": ("msd_hippocampus", {"normalize": "minmax"}),
}


def _instances(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Connected components of a binary (H, W) mask as labels 1..K (largest first); components < min_pixels dropped."""
    components, n = ndimage.label(mask > 0)
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    order = [k + 1 for k in np.argsort(-sizes, kind="stable") if sizes[k] >= min_pixels]
    labels = np.zeros(mask.shape, dtype=np.uint8 if len(order) < 256 else np.uint16)
    for new, old in enumerate(order, start=1):
        labels[components == old] = new
    return labels


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (the loaders' scale) -> uint8 0..255."""
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _real_case(kind: str, item: dict[str, Any], min_pixels: int) -> dict[str, np.ndarray] | None:
    """One loader item as a challenge case, or None when no object is left."""
    if kind.startswith("3D"):
        gts = relabel_instances(item["label"].numpy())  # consecutive ids even if a volume lacked one label
        case = {"imgs": _to_uint8(item["image"][0].numpy()), "gts": gts, "spacing": np.asarray(item["spacing"])}
    else:
        gts = _instances(item["mask"].numpy(), min_pixels)
        case = {"imgs": _to_uint8(item["image"].permute(1, 2, 0).numpy()), "gts": gts}
    if gts.max() == 0:
        return None
    case["boxes"] = boxes_from_labels(case["gts"])
    return case


def write_real_cases(out_dir: str | Path, counts: Mapping[str, int | None], data_dir: str | Path | None = None,
                     kinds: Sequence[str] = tuple(REAL_SOURCES),
                     min_pixels: int = MIN_OBJECT_PIXELS) -> dict[str, list[Path]]:
    """Convert the first ``counts[split]`` items of each real dataset's split into ``<out_dir>/<split>/*.npz``.

    Existing files are kept (the conversion is deterministic), so a second call costs only the listing. Items left
    without an object are skipped and logged.

    Args:
        out_dir: the case folder (``train/``, ``val/``, ``test/`` below it, as :func:`case_splits` reads them).
        counts: ``{split: items per dataset}``, e.g. ``{"train": 40, "val": 10, "test": 10}``; None: all of the
            split's items.
        data_dir: root of the real datasets (None: ``MDBENCH_DATA_DIR``).
        kinds: case kinds to write (keys of :data:`REAL_SOURCES`).
        min_pixels: 2D components smaller than this are dropped.

    Returns:
        ``{split: [paths]}``.
    """
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = defaultdict(list)
    for kind in kinds:
        name, kwargs = REAL_SOURCES[kind]
        for split, count in counts.items():
            dataset = load_dataset(name, split=split, data_dir=data_dir, **kwargs)
            # the registry types its result as Dataset; the box-prompt loaders are map-style, with __len__
            available = len(cast(Sized, dataset))
            for index in range(available if count is None else min(count, available)):
                item = dataset[index]
                path = out_dir / split / case_filename(kind, item["id"])
                if not path.exists():
                    case = _real_case(kind, item, min_pixels)
                    if case is None:
                        log.info("%s %s: no object of >= %d px left, skipped", name, item["id"], min_pixels)
                        continue
                    save_boxprompt_case(path, **case)
                written[split].append(path)
    return dict(written)


def case_splits(folder: str | Path, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                seed: int = 2024) -> dict[str, list[Path]]:
    """Train/val/test case files of a folder of challenge ``.npz`` cases (see the module docstring).

    Raises:
        FileNotFoundError: the folder holds no ``.npz`` file.
    """
    folder = Path(folder)
    if all((folder / split).is_dir() for split in SPLITS):
        splits = {split: sorted((folder / split).glob("*.npz")) for split in SPLITS}
    else:
        by_modality: dict[str, list[Path]] = defaultdict(list)
        for path in sorted(folder.rglob("*.npz")):
            by_modality[modality_from_name(path.name) or "unknown"].append(path)
        splits = {split: [] for split in SPLITS}
        for paths in by_modality.values():
            if len(paths) < 3:  # too few to cut three ways: all of them test
                splits["test"].extend(paths)
                continue
            for split, idx in split_indices(len(paths), fractions=fractions, seed=seed).items():
                splits[split].extend(paths[i] for i in idx)
    if not any(splits.values()):
        raise FileNotFoundError(f"no challenge .npz cases in {folder}")
    return splits


def read_cases(paths: Sequence[str | Path], require_gts: bool = True) -> tuple[list[dict], dict[str, str]]:
    """Read and validate cases (:func:`mdbench.data.boxprompt.read_boxprompt_case`); bad files are logged and skipped.

    Args:
        paths: ``.npz`` case files.
        require_gts: training and scored cases need a non-empty ``gts``; False reads test inputs without one (an
            empty ``gts`` is then kept too, and the evaluation reports it).

    Returns:
        ``(cases, errors)``: the readable cases in order, and ``{file name: message}`` for the others (unreadable,
        missing key, box outside the image, no foreground in ``gts``); a case of unknown modality is kept (modality
        None) for the general model.
    """
    cases, errors = [], {}
    for path in paths:
        try:
            case = read_boxprompt_case(path, require_gts=require_gts)
            if require_gts and not np.asarray(case["gts"]).any():
                raise DataError(f"{Path(path).name}: empty ground truth (no labelled pixel)")
        except (DataError, ValueError) as err:
            errors[Path(path).name] = str(err)
            log.warning("skipping case %s: %s", Path(path).name, err)
            continue
        cases.append(case)
    return cases, errors


def cases_checksum(cases: Sequence[dict]) -> str:
    """SHA-256 over the cases' names and arrays (``imgs``, ``gts``, ``boxes``): names the data exactly, unlike the
    ``.npz`` bytes, which carry zip timestamps."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c["name"]):
        digest.update(case["name"].encode())
        for key in ("imgs", "gts", "boxes"):
            if key in case:
                array = np.ascontiguousarray(case[key])
                digest.update(f"{key}{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
    return digest.hexdigest()

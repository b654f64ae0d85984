"""Datasets: loaders for real datasets in their official layouts, a registry, splits and checksums.

The names below load on first use (PEP 562), so torch-free submodules such as ``mdbench.data.boxprompt`` can be
imported without pulling in torch through the registry (DAFT's deployed inference path relies on it).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ChecksumReport": "checksums", "tree_checksum": "checksums", "verify_sha256sums": "checksums",
    "verification_state": "checksums",
    "CorruptFileError": "errors", "DataError": "errors", "DataIntegrityError": "errors",
    "DataNotFoundError": "errors", "LabelError": "errors", "UnknownDatasetError": "errors",
    "UnverifiedDataWarning": "errors",
    "DATASETS": "registry", "DatasetSpec": "registry", "data_root": "registry", "dataset_table": "registry",
    "get_spec": "registry", "is_present": "registry", "load_dataset": "registry",
    "kfold_splits": "splits", "split_indices": "splits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

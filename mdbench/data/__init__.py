"""Datasets: loaders for real datasets in their official layouts, a registry, splits and checksums."""
from mdbench.data.checksums import ChecksumReport, tree_checksum, verify_sha256sums
from mdbench.data.errors import (CorruptFileError, DataError, DataNotFoundError, LabelError,
                                 UnknownDatasetError)
from mdbench.data.registry import (DATASETS, DatasetSpec, data_root, dataset_table, get_spec, is_present,
                                   load_dataset)
from mdbench.data.splits import kfold_splits, split_indices

__all__ = [
    "DATASETS", "ChecksumReport", "CorruptFileError", "DataError", "DataNotFoundError", "DatasetSpec",
    "LabelError", "UnknownDatasetError", "data_root", "dataset_table", "get_spec", "is_present",
    "kfold_splits", "load_dataset", "split_indices", "tree_checksum", "verify_sha256sums",
]

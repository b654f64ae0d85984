"""Exceptions of the data layer; every message names the file or folder at fault."""
from __future__ import annotations


class DataError(Exception):
    """Base class of every data-layer error."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or file is absent (message names it and says how to point the suite at the data)."""


class CorruptFileError(DataError):
    """A file exists but cannot be decoded (truncated image, broken archive, malformed checksum list)."""


class DataIntegrityError(DataError):
    """A dataset folder does not match its ``SHA256SUMS`` (or has none); the message names the dataset, the folder,
    the bad files and how to restore the data or opt out of verification."""


class UnverifiedDataWarning(UserWarning):
    """A dataset is read without checking its ``SHA256SUMS`` (``MDBENCH_VERIFY_DATA=0`` or ``verify=False``)."""


class UnknownDatasetError(DataError, KeyError):
    """A dataset name that the registry does not know (message lists the known names)."""

    def __str__(self) -> str:
        # KeyError would print the message with quotes around it.
        return str(self.args[0]) if self.args else ""


class LabelError(DataError, ValueError):
    """Labels contradicting the dataset's declaration: unknown class, mask of wrong size, bad volume shape."""

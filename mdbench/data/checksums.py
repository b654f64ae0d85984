"""Checksums: verify a folder's ``SHA256SUMS`` and fingerprint the files a loader read."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mdbench.data.errors import CorruptFileError, DataNotFoundError

SUMS_FILE = "SHA256SUMS"


@dataclass
class ChecksumReport:
    """Outcome of :func:`verify_sha256sums`; the lists hold paths relative to ``folder``."""

    folder: Path
    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.ok) and not self.missing and not self.mismatched

    def summary(self) -> str:
        return (f"{self.folder}: {len(self.ok)} ok, {len(self.missing)} missing, "
                f"{len(self.mismatched)} mismatched")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of one file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256sums(folder: Path | str) -> ChecksumReport:
    """Check every file listed in ``folder/SHA256SUMS`` (``sha256sum`` text or binary format).

    Raises:
        DataNotFoundError: ``folder/SHA256SUMS`` does not exist.
        CorruptFileError: a line of it is not ``<64 hex digits> <space><space or *><path>``.
    """
    folder = Path(folder)
    sums = folder / SUMS_FILE
    if not sums.is_file():
        raise DataNotFoundError(f"no checksum list {sums}")
    report = ChecksumReport(folder=folder)
    for lineno, line in enumerate(sums.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line[:64], line[64:66], line[66:]
        if len(digest) != 64 or sep not in ("  ", " *") or not name or not _is_hex(digest):
            raise CorruptFileError(f"{sums}, line {lineno}: not '<sha256>  <path>': {line!r}")
        path = folder / name
        if not path.is_file():
            report.missing.append(name)
        elif file_sha256(path) != digest.lower():
            report.mismatched.append(name)
        else:
            report.ok.append(name)
    return report


def tree_checksum(paths: Iterable[Path | str], root: Path | str | None = None) -> str:
    """Stable SHA-256 over the (relative name, bytes) pairs of ``paths``, independent of their order.

    Names are taken relative to ``root`` (default: the deepest folder holding all the files), so the
    same files give the same checksum wherever the data root lies.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("tree_checksum needs at least one file")
    base = Path(root) if root is not None else Path(os.path.commonpath([p.parent for p in files]))
    entries = sorted((p.relative_to(base).as_posix(), p) for p in files)
    tree = hashlib.sha256()
    for name, path in entries:
        # NUL cannot occur in a path, so (name, digest) pairs cannot run into each other.
        tree.update(name.encode() + b"\0" + bytes.fromhex(file_sha256(path)))
    return tree.hexdigest()


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True

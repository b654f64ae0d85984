"""Checksums: verify a folder's ``SHA256SUMS`` and fingerprint the files a loader read.

Verification policy, shared by the loaders (:func:`mdbench.data.registry.load_dataset`) and ``mdbench data check``:

* :func:`verify_sha256sums` is the one implementation: every listed file must exist and match its digest, and
  every other file or folder under the dataset folder is *unlisted* (a problem too).
* Digests can come from a persistent cache (:func:`hash_cache_path`), keyed by (path, size, mtime_ns), so a warm
  verification reads only file metadata; the cache lives in the user's cache folder, never in the data folder.
* ``MDBENCH_VERIFY_DATA=0`` (or ``load_dataset(..., verify=False)``) reads data unverified; that is warned about
  once per dataset and recorded by :func:`verification_state` in every result's fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import stat
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
from filelock import FileLock, Timeout

from mdbench.data.errors import CorruptFileError, DataError, DataNotFoundError, UnverifiedDataWarning
from mdbench.io import atomic_write

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
# Folder-view metadata that file managers drop into folders; no loader reads them (none has an image suffix).
# Other hidden files do count as unlisted: the loaders' pathlib globs match dot-files too.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
VERIFY_ENV = "MDBENCH_VERIFY_DATA"
CACHE_ENV = "MDBENCH_CACHE_DIR"
_CACHE_VERSION = 1
# Files modified less than this before being hashed are not cached (see verify_sha256sums).
_RACY_NS = 2_000_000_000
_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}

# dataset name -> why it was read unverified, for verification_state()
_unverified: dict[str, str] = {}


@dataclass
class ChecksumReport:
    """Outcome of :func:`verify_sha256sums`; the lists hold paths relative to ``folder``.

    ``unlisted`` holds files (and folders, with a trailing ``/``, not descended into) that ``SHA256SUMS`` does not
    cover; ``hashed`` counts the files actually read (the rest came from the hash cache).
    """

    folder: Path
    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    hashed: int = 0

    @property
    def passed(self) -> bool:
        return bool(self.ok) and not self.missing and not self.mismatched and not self.unlisted

    def problems(self) -> list[tuple[str, str]]:
        """Each bad path as ``(kind, relative path)``, kind one of "mismatched", "missing", "unlisted"."""
        return ([("mismatched", n) for n in self.mismatched] + [("missing", n) for n in self.missing]
                + [("unlisted", n) for n in self.unlisted])

    def summary(self) -> str:
        return (f"{self.folder}: {len(self.ok)} ok, {len(self.missing)} missing, "
                f"{len(self.mismatched)} mismatched, {len(self.unlisted)} unlisted")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of one file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256sums(folder: Path | str, use_cache: bool = False) -> ChecksumReport:
    """Check ``folder`` against its ``SHA256SUMS``: listed files missing or mismatched, other files unlisted.

    Unlisted means any file or folder under ``folder`` that is neither listed nor holds a listed file, except the
    top-level ``SHA256SUMS`` itself and the file-manager metadata in :data:`IGNORED_NAMES`. Hidden files are not
    exempt, because the loaders' globs would read them.

    Args:
        use_cache: take a file's digest from the hash cache when its (path, size, mtime_ns) is unchanged, so
            unchanged files are not read again. Off by default: an explicit check re-reads every byte. Either way
            the digests computed are stored in the cache for later runs.

    Raises:
        DataNotFoundError: ``folder/SHA256SUMS`` does not exist.
        CorruptFileError: a line of it is malformed.
    """
    folder = Path(folder)
    listed = _read_sums(folder)
    report = ChecksumReport(folder=folder)
    base = str(folder.resolve())
    prefix = base + os.sep
    cache_file = hash_cache_path()
    before = _load_cache(cache_file, prefix)
    entries: dict[str, list] = {}
    for name, digest in listed:
        key = os.path.join(base, name)
        now = time.time_ns()
        try:
            st = os.stat(key)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            report.missing.append(name)
            continue
        signature = [st.st_size, st.st_mtime_ns]
        hit = before.get(key)
        if use_cache and hit is not None and hit[:2] == signature:
            actual = hit[2]
            entries[key] = hit
        else:
            actual = file_sha256(Path(key))
            report.hashed += 1
            # A file modified just before this stat could change again within the same mtime tick unnoticed
            # (coarse timestamps), so such a "racy" digest is not cached, as in git's index.
            if st.st_mtime_ns < now - _RACY_NS:
                entries[key] = [*signature, actual]
        (report.ok if actual == digest else report.mismatched).append(name)
    report.unlisted = _unlisted(folder, [name for name, _ in listed])
    if entries != before:
        _save_cache(cache_file, prefix, entries)
    return report


def hash_cache_path() -> Path:
    """The persistent digest cache: ``$MDBENCH_CACHE_DIR/data/sha256.json``, else in the user cache folder
    (platformdirs, e.g. ``~/.cache/mdbench/data/sha256.json`` on Linux)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = platformdirs.user_cache_dir("mdbench", appauthor=False)
    return Path(root).expanduser() / "data" / "sha256.json"


def verification_enabled(verify: bool | None = None) -> bool:
    """Whether to verify datasets: ``verify`` if given, else ``$MDBENCH_VERIFY_DATA`` (default on).

    Raises:
        DataError: the variable holds something other than 0/1, false/true, no/yes or off/on.
    """
    if verify is not None:
        return bool(verify)
    value = os.environ.get(VERIFY_ENV, "").strip().lower()
    if not value or value in _ON:
        return True
    if value in _OFF:
        return False
    raise DataError(f"{VERIFY_ENV}={os.environ[VERIFY_ENV]!r} is not understood: use 1 (verify datasets against "
                    f"their {SUMS_FILE}, the default) or 0 (read them unverified)")


def note_unverified(name: str, folder: Path, reason: str) -> None:
    """Record that dataset ``name`` is read without verification (``reason``: how it was switched off) and warn,
    once per dataset and process."""
    if name not in _unverified:
        warnings.warn(f"dataset {name!r} in {folder} is read without checking its {SUMS_FILE} ({reason}): "
                      "results from it may come from modified data; result records say so",
                      UnverifiedDataWarning, stacklevel=3)
    _unverified[name] = reason


def verification_state() -> str:
    """How datasets are checked in this process, for the result fingerprint: ``"sha256"``, or
    ``"off (MDBENCH_VERIFY_DATA=0)"`` / ``"off for pbc (verify=False)"`` naming how and for which datasets it was
    switched off."""
    if _unverified:
        reasons = sorted(set(_unverified.values()))
        return f"off for {', '.join(sorted(_unverified))} ({'; '.join(reasons)})"
    if not verification_enabled():
        return f"off ({VERIFY_ENV}={os.environ[VERIFY_ENV]})"
    return "sha256"


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


def _read_sums(folder: Path | str) -> list[tuple[str, str]]:
    """``(relative path, lower-case hex digest)`` for each line of ``folder/SHA256SUMS``.

    Accepts ``sha256sum``'s text and binary formats; a leading ``./`` is dropped so names match the folder walk.

    Raises:
        DataNotFoundError: ``folder/SHA256SUMS`` does not exist.
        CorruptFileError: a line is not ``<64 hex digits> <space><space or *><relative path inside folder>``.
    """
    sums = Path(folder) / SUMS_FILE
    if not sums.is_file():
        raise DataNotFoundError(f"no checksum list {sums}: copy the {SUMS_FILE} that came with the data into "
                                f"{sums.parent}")
    entries = []
    for lineno, line in enumerate(sums.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line[:64], line[64:66], line[66:]
        if (len(digest) != 64 or sep not in ("  ", " *") or not name or not _is_hex(digest)
                or name.startswith("/") or ".." in name.split("/")):
            raise CorruptFileError(f"{sums}, line {lineno}: not '<sha256>  <relative path>': {line!r}")
        entries.append((posixpath.normpath(name), digest.lower()))
    return entries


def _unlisted(folder: Path, listed: list[str]) -> list[str]:
    """Files and top-most folders under ``folder`` that ``listed`` neither names nor leads to, sorted."""
    files = set(listed)
    parents = set()
    for name in listed:
        while (name := posixpath.dirname(name)) and name not in parents:
            parents.add(name)
    found = []
    for here, dirs, names in os.walk(folder):
        rel = os.path.relpath(here, folder).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        for d in list(dirs):
            if prefix + d not in parents:
                found.append(prefix + d + "/")
                dirs.remove(d)  # report the folder once, not each file inside it
        for n in names:
            path = prefix + n
            if path not in files and path != SUMS_FILE and n not in IGNORED_NAMES:
                found.append(path)
    return sorted(found)


def _load_cache(path: Path, prefix: str = "") -> dict[str, list]:
    """The cache's entries ``{absolute path: [size, mtime_ns, sha256]}`` for paths starting with ``prefix``; empty
    when the file is absent, unreadable or malformed (a cache must never stop a run), skipping malformed entries."""
    try:
        data = json.loads(path.read_text())
        files = data["files"] if data.get("version") == _CACHE_VERSION else {}
        return {k: v for k, v in files.items() if k.startswith(prefix) and _valid_entry(v)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        log.warning("ignoring unreadable hash cache %s (%s); files will be hashed again", path, err)
        return {}


def _save_cache(path: Path, prefix: str, entries: dict[str, list]) -> None:
    """Replace the cache's entries under ``prefix`` (one dataset folder) by ``entries``, atomically.

    The read-merge-write runs under a file lock so concurrent runs (``reproduce --jobs``) keep each other's
    entries; failing to write only costs re-hashing later, so it is logged, never raised.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock", timeout=30):
            merged = {k: v for k, v in _load_cache(path).items() if not k.startswith(prefix)}
            merged.update(entries)
            atomic_write(path, json.dumps({"version": _CACHE_VERSION, "files": merged}))
    except (OSError, Timeout) as err:
        log.warning("could not write the hash cache %s (%s); files will be hashed again next time", path, err)


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry[:2])
            and isinstance(entry[2], str) and len(entry[2]) == 64)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True

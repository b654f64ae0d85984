"""Atomic file writes, the one helper every writer of the suite uses (records, tables, figures, checkpoints, cached
features, box-prompt cases, the data checksum cache).

Standard library only, so that every layer may import it, :mod:`mdbench.data` included (see CONTRIBUTING.md,
"Imports flow one way").
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# a cut-off write leaves at most a ``.tmp-*.tmp`` file: git ignores it, no reader globbing ``*.json`` or ``*.npz``
# takes it for a result, and the runner sweeps ``.tmp-*`` files of dead runs
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".tmp"


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then an atomic rename: readers see
    the old file or the new one, never half of one, and a failed write leaves the old file and no temporary one.

    ``data``: bytes, text (written as UTF-8), or a function that writes to the open binary file (``torch.save``,
    ``np.savez_compressed``). The parent folder is created; the file is readable by anyone (0644), as results are
    meant to be. Returns ``path``.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the folder {path.parent} of {path.name}: {err}") from err
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates files private (0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

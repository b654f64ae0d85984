"""Run-stamped output folders, so that a rerun never overwrites the committed reference ``results/``.

``mdbench reproduce`` writes to ``<runs root>/<UTC stamp>-<profile>/`` (e.g. ``runs/20260102T030405Z-cpu/``) unless
told to refresh the reference (``--update-reference``) or given a folder (``--results-dir``); ``mdbench compare``
then says whether the rerun agrees with the reference. The runs root is ``runs/`` at the repository root unless
``MDBENCH_RUNS_DIR`` says otherwise. Only the standard library is imported here, so that the CLI starts quickly.
"""
from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# <stamp>[.<n>]-<profile>: .<n> tells apart runs started in the same second
_RUN_NAME = re.compile(r"^(?P<stamp>\d{8}T\d{6}Z)(?:\.(?P<n>\d+))?-(?P<profile>.+)$")


class RunsError(ValueError):
    """No run folder to resume."""


def runs_root() -> Path:
    """``MDBENCH_RUNS_DIR`` if set, else ``runs/`` at the repository root (ignored by git)."""
    return Path(os.environ.get("MDBENCH_RUNS_DIR") or _REPO_ROOT / "runs").expanduser().absolute()


def new_run_folder(profile: str, root: Path | None = None, now: datetime | None = None) -> Path:
    """The path of a new run folder ``<root>/<UTC stamp>-<profile>`` (not created: the runner does that when it
    starts); a run started in the same second as an earlier one gets ``<stamp>.<n>-<profile>``."""
    root = Path(root) if root is not None else runs_root()
    stamp = (now or datetime.now(UTC)).strftime(STAMP_FORMAT)
    folder, n = root / f"{stamp}-{profile}", 1
    while folder.exists():
        n += 1
        folder = root / f"{stamp}.{n}-{profile}"
    return folder


def run_folders(profile: str, root: Path | None = None) -> list[Path]:
    """The run folders of ``profile`` under ``root`` (default :func:`runs_root`) that hold anything, oldest first (a
    run refused before its first notebook, e.g. with nothing to run, leaves an empty one)."""
    root = Path(root) if root is not None else runs_root()
    found = []
    for path in root.glob(f"*-{profile}") if root.is_dir() else ():
        match = _RUN_NAME.match(path.name)
        if path.is_dir() and match and match["profile"] == profile and any(path.iterdir()):
            found.append(((match["stamp"], int(match["n"] or 1)), path))
    return [path for _, path in sorted(found)]


def latest_run_folder(profile: str, root: Path | None = None) -> Path:
    """The newest run folder of ``profile`` (what ``--resume`` continues); an error saying what to do where there is
    none."""
    root = Path(root) if root is not None else runs_root()
    folders = run_folders(profile, root)
    if not folders:
        raise RunsError(f"--resume: no earlier run of profile {profile!r} under {root} to resume; start one without "
                        "--resume, or name the folder to resume with --results-dir")
    return folders[-1]

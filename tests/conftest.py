"""Shared fixtures: the real-data root, session cache, run and config folders, and torch threads (1 unless told
otherwise)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers keep the real subsets in ../shared/data beside the checkout.
_DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """One thread by default; ``MDBENCH_TEST_THREADS=2`` reruns the suite multi-threaded to show that no result
    depends on the thread count (kernels sum in another order with more threads)."""
    torch.set_num_threads(int(os.environ.get("MDBENCH_TEST_THREADS", "1")))


@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory):
    """Caches (the dataset hash cache, EFCM features) go to a session folder, never to the user's cache folder
    (~/.cache/mdbench) or the checkout's .cache/."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MDBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("mdbench-cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _session_runs_and_config_dirs(tmp_path_factory):
    """Run folders of ``mdbench reproduce`` (:mod:`mdbench.runs`) and registered datasets (``datasets.yaml``) go to
    session folders, never to the checkout's runs/ or the user's ~/.config/mdbench."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MDBENCH_RUNS_DIR", str(tmp_path_factory.mktemp("mdbench-runs")))
        patch.setenv("MDBENCH_CONFIG_DIR", str(tmp_path_factory.mktemp("mdbench-config")))
        yield


@pytest.fixture
def fresh_data_verification(tmp_path, monkeypatch):
    """A private hash cache, verification on, and fresh in-process verification state, for one test."""
    from mdbench.data import checksums, registry

    monkeypatch.setenv("MDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MDBENCH_VERIFY_DATA", raising=False)
    monkeypatch.setattr(registry, "_verified", {})
    monkeypatch.setattr(checksums, "_unverified", {})


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Root of the real datasets (``MDBENCH_DATA_DIR`` or ``../shared/data``); skips when absent."""
    root = Path(os.environ.get("MDBENCH_DATA_DIR") or _DEFAULT_SHARED_DATA)
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}: set MDBENCH_DATA_DIR to the datasets' root")
    return root


def real_dataset(root: Path, folder: str) -> Path:
    """Path of one dataset's folder under the real-data root; skips the test when it is absent."""
    path = root / folder
    if not path.is_dir():
        pytest.skip(f"dataset folder {path} is absent")
    return path

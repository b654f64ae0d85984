"""Shared fixtures: the real-data root and quiet, single-threaded torch for fast, repeatable tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers keep the real subsets in ../shared/data beside the checkout.
_DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    torch.set_num_threads(1)


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

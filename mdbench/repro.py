"""Reproducibility: seeding, deterministic mode and an environment fingerprint for every result record."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
from typing import Any

import numpy as np
import torch

from mdbench.data.checksums import verification_state
from mdbench.environment import code_hash, cpu_name, git_state, package_versions


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and every CUDA device); optionally switch on deterministic kernels.

    Returns a ``torch.Generator`` seeded with ``seed`` to pass to ``DataLoader(generator=...)`` together with
    :func:`seed_worker`, so shuffling and worker RNGs are reproducible as well.
    """
    seed_rngs(seed)
    set_deterministic(deterministic)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_rngs(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device), leaving the deterministic mode as it is."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms on (smoke/cpu profiles) or off (gpu profile, where speed matters more)."""
    if enabled:
        # cuBLAS needs this workspace setting for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: derive NumPy/random seeds of a worker from torch's seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def hardware() -> dict[str, Any]:
    """CPU, thread count and GPU (name and memory) of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": None,
        "gpu_memory_gib": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def fingerprint() -> dict[str, Any]:
    """Everything a result depends on besides its config: Python, packages, git state, the hash of the suite's code
    (:func:`~mdbench.environment.code_hash`: what ties a result to its code where git cannot), hardware, and whether
    the datasets were verified against their SHA256SUMS (``"sha256"``, or ``"off ..."`` saying how and for which)."""
    return {
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_state(),
        "code": code_hash(),
        "hardware": hardware(),
        "data_verification": verification_state(),
    }


def config_hash(config: dict[str, Any]) -> str:
    """Short, stable hash of a JSON-serialisable config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]

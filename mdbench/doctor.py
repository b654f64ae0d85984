"""``mdbench doctor``: what this machine has for running the suite, and how to fix what it lacks.

Problems stop the smoke profile (a wrong Python, a missing package, no Jupyter kernel); notes say what the other
profiles need (real data, a GPU) and are information, not failures. Nothing here imports torch, so that the doctor
answers at once: GPUs are the driver's (``nvidia-smi``); whether torch can use them is checked by
``mdbench reproduce --profile gpu``.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mdbench.environment import cpu_name, nvidia_gpus, package_versions

DATA_FIX = ("pass --data-dir DIR to mdbench reproduce (or set MDBENCH_DATA_DIR) to the folder that holds the "
            "datasets; `mdbench data list --data-dir DIR` shows what it has")


@dataclass
class Diagnosis:
    """The report's lines, the problems that stop even the smoke profile (each with its fix), and notes."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _kernelspec() -> tuple[str | None, str | None]:
    """(resource dir of the ``python3`` Jupyter kernel, problem) -- papermill and nbval run notebooks on it."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        spec = KernelSpecManager().get_kernel_spec("python3")
        return spec.resource_dir, None
    except NoSuchKernel:
        return None, "no 'python3' Jupyter kernel: run `.venv/bin/python -m ipykernel install --sys-prefix`"
    except ImportError:
        return None, "jupyter_client is not installed: run `make .venv`"


def diagnose() -> Diagnosis:
    """Check Python, the key packages, the CPU and GPUs, the Jupyter kernel and the data folder."""
    found = Diagnosis()
    found.lines.append(f"python            {platform.python_version()} ({sys.executable})")
    if sys.version_info[:2] != (3, 11):
        found.problems.append(f"Python {platform.python_version()}: the lock is made for 3.11; use python3.11 for "
                              ".venv")
    for name, version in package_versions().items():
        found.lines.append(f"{name:<17} {version}")
        if version == "not installed":
            found.problems.append(f"{name} is not installed: run `make .venv` (installs requirements/lock.txt)")
    found.lines.append(f"cpu               {cpu_name()} ({os.cpu_count()} cores)")
    gpus = nvidia_gpus()
    found.lines.extend(f"gpu               {gpu}" for gpu in gpus)
    if not gpus:
        found.lines.append("gpu               none")
        found.notes.append("no NVIDIA GPU: profiles smoke and cpu run; --profile gpu needs one")
    spec_dir, problem = _kernelspec()
    found.lines.append(f"kernel python3    {spec_dir or 'missing'}")
    if problem:
        found.problems.append(problem)
    _check_data(found)
    return found


def _check_data(found: Diagnosis) -> None:
    from mdbench.data.registry import ENV_VAR, dataset_table

    env = os.environ.get(ENV_VAR)
    if not env:
        found.lines.append(f"data              {ENV_VAR} not set")
        found.notes.append(f"no data folder: --profile smoke runs on synthetic data; for --profile cpu or gpu, "
                           f"{DATA_FIX}")
        return
    if not Path(env).is_dir():
        found.lines.append(f"data              {env} (missing)")
        found.notes.append(f"{ENV_VAR}={env} is not a folder: {DATA_FIX}")
        return
    rows = dataset_table(Path(env))
    present = [r["name"] for r in rows if r["present"]]
    absent = [r["name"] for r in rows if not r["present"]]
    found.lines.append(f"data              {env}: {len(present)}/{len(rows)} datasets present")
    if absent:
        found.notes.append(f"datasets absent from {env}: {', '.join(absent)} (data_cards/<name>.md says where to get "
                           "them); the notebooks that need them are skipped at --profile cpu and gpu")

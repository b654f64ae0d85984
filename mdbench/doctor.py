"""``mdbench doctor``: what this machine has for running the suite, and how to fix what it lacks."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from mdbench.repro import hardware, package_versions


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


def diagnose() -> tuple[list[str], list[str]]:
    """(report lines, problems each with its fix)."""
    lines, problems = [], []
    lines.append(f"python            {platform.python_version()} ({sys.executable})")
    if sys.version_info[:2] != (3, 11):
        problems.append(f"Python {platform.python_version()}: the lock is made for 3.11; use python3.11 for .venv")
    for name, version in package_versions().items():
        lines.append(f"{name:<17} {version}")
        if version == "not installed":
            problems.append(f"{name} is not installed: run `make .venv` (installs requirements/lock.txt)")
    hw = hardware()
    lines.append(f"cpu               {hw['cpu']} ({hw['cpu_count']} cores, torch uses {hw['torch_threads']} threads)")
    if hw["gpu"]:
        lines.append(f"gpu               {hw['gpu']} ({hw['gpu_memory_gib']} GiB, CUDA {hw['cuda']})")
    else:
        lines.append("gpu               none (profiles smoke and cpu run; gpu is skipped)")
    spec_dir, problem = _kernelspec()
    lines.append(f"kernel python3    {spec_dir or 'missing'}")
    if problem:
        problems.append(problem)
    lines.extend(_data_lines(problems))
    return lines, problems


def _data_lines(problems: list[str]) -> list[str]:
    from mdbench.data.registry import dataset_table

    env = os.environ.get("MDBENCH_DATA_DIR")
    if not env:
        problems.append("MDBENCH_DATA_DIR is not set: the cpu/gpu profiles need it (e.g. export "
                        "MDBENCH_DATA_DIR=../shared/data); smoke runs on synthetic data without it")
        return ["data              MDBENCH_DATA_DIR not set"]
    if not Path(env).is_dir():
        problems.append(f"MDBENCH_DATA_DIR={env} is not a folder")
        return [f"data              {env} (missing)"]
    rows = dataset_table(Path(env))
    present = [r["name"] for r in rows if r["present"]]
    absent = [r["name"] for r in rows if not r["present"]]
    lines = [f"data              {env}: {len(present)}/{len(rows)} datasets present"]
    if absent:
        lines.append(f"                  absent: {', '.join(absent)} (see data_cards/ for where to get them)")
    return lines

"""Seconds per case with each case in a fresh process, as the MedSAM-on-Laptop challenge measured runtime.

The challenge ran ``docker container run ... predict.sh`` once per test case (``CVPR24_time_eval.py``), so its time
includes interpreter start, imports and model loading. Here each case is one
``python -m mdbench.papers.daft.deploy.predict`` process (no container: its start-up is the one part of the
challenge's time not measured), timed from launch to exit with ``time.perf_counter``. :func:`table_b_stages` gives
DAFT's cumulative improvements as command-line options.

As a benchmark script, it prints seconds per case for every stage and the speed-up over the first::

    python -m mdbench.papers.daft.deploy.timing --models DEPLOY_DIR [--threads N] CASE.npz [CASE.npz ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["Stage", "main", "table_b_stages", "time_cases"]


@dataclass(frozen=True)
class Stage:
    """One row of Table B: a name and the options of ``mdbench.papers.daft.deploy.predict`` it runs with.

    ``compile_cache``: the stage uses OpenVINO's compiled-model cache; the timer empties it before the stage's first
    case, so that case pays the compilation and later ones load the cached blobs (as in the challenge, where the
    cache folder persisted across the per-case containers).
    """

    name: str
    options: tuple[str, ...]
    compile_cache: bool = False
    notes: str = field(default="", compare=False)


def table_b_stages() -> list[Stage]:
    """DAFT's efficiency steps, cumulative, as options of ``mdbench.papers.daft.deploy.predict`` (Table B rows)."""
    return [
        Stage("LiteMedSAM (PyTorch)", ("--backend", "torch", "--baseline"),
              notes="eager PyTorch TinyViT baseline; every 3D slice re-embedded per box"),
        Stage("+ EfficientViT", ("--backend", "torch"), notes="distilled student experts, PyTorch, all loaded"),
        Stage("+ OpenVINO", ("--backend", "openvino"), notes="OpenVINO IR, no torch import, all experts compiled"),
        Stage("+ embedding cache", ("--backend", "openvino", "--embedding-cache"),
              notes="each 3D slice embedded once"),
        Stage("+ compile cache, lazy load", ("--backend", "openvino", "--embedding-cache", "--lazy"),
              compile_cache=True, notes="only the needed expert, compiled blobs reused across processes"),
    ]


def time_cases(cases: Sequence[str | Path], stage: Stage, models: str | Path, workdir: str | Path,
               threads: int | None = None, timeout_s: float = 600.0) -> pd.DataFrame:
    """Run each case in its own fresh ``python -m mdbench.papers.daft.deploy.predict`` process and time it.

    Args:
        cases: challenge ``.npz`` files.
        stage: the options to run with (see :func:`table_b_stages`).
        models: the deployment folder.
        workdir: outputs go to ``workdir/<stage>/out``, the compile cache to ``workdir/<stage>/cache``.
        threads: ``--threads`` and ``OMP_NUM_THREADS`` of the processes (None: the libraries' defaults).

    Returns:
        One row per case: ``case``, ``stage``, ``seconds`` (launch to exit), ``returncode``, ``error`` (stderr tail),
        ``output`` (the ``.npz`` with ``segs`` the process wrote, when it succeeded).
    """
    folder = Path(workdir) / "".join(c if c.isalnum() else "_" for c in stage.name).strip("_")
    cache = folder / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    options = list(stage.options) + (["--compile-cache", str(cache)] if stage.compile_cache else [])
    options += ["--models", str(models), "--out", str(folder / "out")]
    if threads:
        options += ["--threads", str(threads)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    rows = []
    for case in cases:
        command = [sys.executable, "-m", "mdbench.papers.daft.deploy.predict", *options, str(case)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        seconds = time.perf_counter() - start
        rows.append({"case": Path(case).name, "stage": stage.name, "seconds": seconds,
                     "returncode": done.returncode, "error": done.stderr.strip()[-500:] if done.returncode else "",
                     "output": str(folder / "out" / Path(case).name)})
    return pd.DataFrame(rows, columns=["case", "stage", "seconds", "returncode", "error", "output"])


def main(argv: list[str] | None = None) -> int:
    """Time every Table B stage on the cases and print seconds per case and speed-ups; return 1 if any run failed."""
    parser = argparse.ArgumentParser(prog="python -m mdbench.papers.daft.deploy.timing",
                                     description="seconds per case, each case in a fresh process, for every stage")
    parser.add_argument("cases", nargs="+", type=Path, help="challenge .npz case files")
    parser.add_argument("--models", type=Path, required=True, help="deployment folder (save_deployment)")
    parser.add_argument("--threads", type=int, help="threads of the timed processes (default: all cores)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        frame = pd.concat([time_cases(args.cases, stage, args.models, workdir, args.threads)
                           for stage in table_b_stages()], ignore_index=True)
    table = frame.pivot(index="case", columns="stage", values="seconds")[[s.name for s in table_b_stages()]]
    means = table.mean()
    print(table.round(2).to_string())
    print(pd.DataFrame({"seconds per case": means, "speed-up": means.iloc[0] / means}).round(2).to_string())
    failed = frame[frame.returncode != 0]
    for row in failed.itertuples():
        print(f"FAILED {row.stage} {row.case}: {row.error}")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())

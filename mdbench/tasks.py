"""Notebook runs as tasks that any executor can dispatch, and the sharding of a notebook's seeds across tasks.

A :class:`Task` is one papermill run of one paper's notebook at a profile, in a folder of its own (its
*workspace*): the whole notebook, or a *shard* of it that runs some of its seeds. Nothing of a task is read from or
written to the results folder while it runs: :func:`run_task` takes the notebook and any stored units of work as
bytes, and returns as bytes what the run made (:class:`TaskOutput`), which the caller writes into the results folder
(:func:`write_outputs`, each file atomically). So a task can run on another machine with no shared file system.

Sharding and merging (:func:`plan`). A notebook whose ``seeds`` parameter lists several seeds can be split into
``shards`` tasks, each running the notebook with some of the seeds (``seeds=[0, 2]``) into its own workspace. Every
unit of work is stored keyed by its seed (:mod:`mdbench.work`), and the units' identity leaves the seeds out
(:data:`mdbench.params.SELECTORS`), so the *merge* task is the notebook run once more with all its seeds and
``resume=True`` over the union of the shards' units: it loads every unit instead of computing it, and builds the
records, tables, claims and figures exactly as an unsharded run does (the same records bar their ``time`` and
``fingerprint``, and timings a notebook measures outside its units). A shard returns only its units and its log; the
merge returns what an unsharded run returns.

What a task returns. A run that ended well: everything under its ``<paper>/<profile>/`` folder (executed notebook,
log, records, per-sample outputs, tables, figures, units of work). A run that failed or timed out (the runner's
:class:`~mdbench.runner.NotebookRun` stops it past its paper.yaml's ``timeout_minutes``): only its failed notebook,
its log and the units it stored (for a later ``--resume``), never the records or tables it had half made.

Retries. A task's workspace is ``<base>/<run id>/<task name>`` on the machine that runs it: a task started again on
the same machine after its worker died (an executor's retry) finds the units its first attempt stored there and
resumes from them (where the notebook declares ``resume``).
"""
from __future__ import annotations

import ast
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mdbench.io import atomic_write
from mdbench.runner import (
    TMP_PREFIX,
    NotebookRun,
    PaperNotebook,
    Profile,
    RunnerError,
    RunResult,
    folder_lock,
    notebook_parameters,
    remove_temp_files,
)

WORK = "work"  # the units of work's folder in a paper's results folder (mdbench.notebook.start)
POLL_S = 0.5  # how often a task looks whether its notebook has ended
STOP_POLL_S = 2.0  # how often it asks whether it is to stop


@dataclass(frozen=True)
class Task:
    """One notebook run to dispatch.

    ``seeds``: the seeds a shard runs (None: the notebook's own, the whole run). ``merge``: the run that merges the
    shards named by ``shards`` (each a :attr:`name`). ``resources``: what one run holds while it runs, as
    ``{"GPU": 1}`` on a GPU profile or ``{"CPU": threads}`` otherwise (an executor's worker resources).
    """

    entry: PaperNotebook
    profile: Profile
    seeds: tuple[int, ...] | None = None
    shards: tuple[str, ...] = ()
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        """``.seeds-0-2`` for a shard of seeds 0 and 2; empty for a whole run or a merge."""
        return "" if self.seeds is None else f".seeds-{'-'.join(map(str, self.seeds))}"

    @property
    def name(self) -> str:
        """``<paper>`` for a whole run or a merge, ``<paper>.seeds-0-2`` for a shard."""
        return self.entry.paper + self.suffix

    @property
    def label(self) -> str:
        """The task in the summary table: the notebook's file name, and the seeds of a shard."""
        name = self.entry.notebook.name
        return name if self.seeds is None else f"{name} [seeds {' '.join(map(str, self.seeds))}]"


@dataclass
class TaskOutput:
    """What ``task`` made: how it went, and its files as ``{path relative to <paper>/<profile>/: bytes}``."""

    task: Task
    result: RunResult
    files: dict[str, bytes]


def resources(profile: Profile, parameters: dict[str, Any]) -> dict[str, float]:
    """One GPU on a GPU profile; else the CPU threads the run uses (its ``threads`` parameter, else 1)."""
    return {"GPU": 1} if profile.requires_gpu else {"CPU": float(parameters.get("threads") or 1)}


def seeds_of(entry: PaperNotebook, profile: Profile) -> list[int] | None:
    """The seeds the notebook runs at ``profile`` (its paper's parameter, else its parameters cell's default); None
    where it declares no ``seeds``."""
    declared = notebook_parameters(entry.notebook)
    if "seeds" not in declared:
        return None
    seeds = entry.parameters_for(profile).get("seeds")
    if seeds is None:  # papermill gives a default as its source text
        seeds = ast.literal_eval(declared["seeds"])
    return [int(seed) for seed in seeds]


def plan(entry: PaperNotebook, profile: Profile, shards: int = 1) -> list[Task]:
    """The tasks of one notebook: itself; or, with ``shards`` > 1 and at least two seeds, one shard per group of
    seeds (seed i in shard i mod ``shards``), then the merge, which comes last."""
    if shards < 1:
        raise RunnerError(f"--shards must be at least 1, got {shards}")
    needs = resources(profile, entry.parameters_for(profile))
    seeds = seeds_of(entry, profile) if shards > 1 else None
    if not seeds or len(seeds) < 2:
        return [Task(entry, profile, resources=needs)]
    if "resume" not in notebook_parameters(entry.notebook):
        raise RunnerError(f"{entry.notebook.name} cannot be sharded: its parameters cell declares no resume, "
                          "which the merge needs to load the shards' units of work")
    groups = [tuple(seeds[i::shards]) for i in range(min(shards, len(seeds)))]
    parts = [Task(entry, profile, seeds=group, resources=needs) for group in groups]
    return [*parts, Task(entry, profile, shards=tuple(p.name for p in parts), resources=needs)]


def run_task(task: Task, notebook: bytes, units: dict[str, bytes], run_id: str, data_dir: Path | None,
             resume: bool, base: Path | None = None, stopped: Callable[[], bool] | None = None) -> TaskOutput:
    """Run ``task`` in its workspace under ``base`` (default: the system's temporary folder) and return its outputs.

    ``notebook``: the notebook file's bytes. ``units``: stored units of work (paths under ``work/``: bytes) to load:
    the shards' for a merge, the results folder's with ``--resume``. ``resume``: the run loads stored units (always
    for a merge, and for a retry that finds its first attempt's units). The workspace is removed once the outputs are
    read; a worker that dies leaves it for the retry. ``stopped``: asked every few seconds; once it says True the
    notebook is stopped and the task ends ``interrupted`` (the caller was stopped by a signal).
    """
    workspace = Path(base or tempfile.gettempdir()) / "mdbench-tasks" / run_id / task.name
    folder = workspace / task.entry.paper / task.profile.name
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):  # a retry never overlaps an attempt whose notebook is still being stopped
        remove_temp_files(folder)
        retried = any((folder / WORK).rglob("*.pt"))
        for path, data in units.items():
            atomic_write(folder / WORK / path, data)
        copy = atomic_write(workspace / "notebooks" / task.entry.notebook.name, notebook)
        declared = notebook_parameters(copy)
        extra: dict[str, Any] = {"seeds": list(task.seeds)} if task.seeds is not None else {}
        if "resume" in declared and (resume or retried or bool(task.shards)):
            extra["resume"] = True
        own = task.entry.parameters.get(task.profile.name, {})
        entry = replace(task.entry, notebook=copy, parameters={**task.entry.parameters,
                                                               task.profile.name: {**own, **extra}})
        run = NotebookRun(entry, task.profile, workspace, data_dir)
        try:
            run.start()
        except RunnerError as err:
            return TaskOutput(task, replace(run.discard("failed", str(err)), notebook=task.label), {})
        try:
            result, asked = run.poll(), time.monotonic()
            while result is None:
                time.sleep(POLL_S)
                result = run.poll()
                if result is None and stopped is not None and time.monotonic() - asked > STOP_POLL_S:
                    if stopped():
                        run.stop()
                        run.wait_stopped()
                        result = run.discard("interrupted", "stopped: the run that dispatched it was stopped")
                    asked = time.monotonic()
        finally:  # the worker's task was cancelled: nothing may outlive it
            run.stop()
            run.wait_stopped()
        files = _outputs(folder, keep_all=result.status == "ok" and task.seeds is None)
    shutil.rmtree(workspace, ignore_errors=True)
    with contextlib.suppress(OSError):  # the run's folder goes with its last task
        workspace.parent.rmdir()
    result = replace(result, notebook=task.label, output=None, log=None)
    return TaskOutput(task, result, files)


def _outputs(folder: Path, keep_all: bool) -> dict[str, bytes]:
    """The files a run left under ``folder``: all of them (``keep_all``), else only its units of work, failed
    notebook and log; never a temporary file or the lock."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith((TMP_PREFIX, ".tmp-")) for part in relative.parts):
            continue
        if keep_all or relative.parts[0] == WORK or path.name.endswith((".failed.ipynb", ".log")):
            files[relative.as_posix()] = path.read_bytes()
    return files


def stored_units(folder: Path) -> dict[str, bytes]:
    """The units of work stored under ``folder / "work"`` (``<paper>/<profile>/``), by path under it, for a task."""
    work = folder / WORK
    if not work.is_dir():
        return {}
    return {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*.pt"))
            if not p.name.startswith(".tmp-")}


def write_outputs(output: TaskOutput, folder: Path) -> RunResult:
    """Write a task's files into the results ``folder`` (``<paper>/<profile>/``), each atomically, and return its
    result pointing at the executed (or failed) notebook and the log it wrote there. A shard writes its log as
    ``<notebook stem>.seeds-0-2.log`` beside the merged run's; its units go to ``work/`` as any run's do."""
    task, result = output.task, output.result
    stem = task.entry.notebook.stem
    log = f"{stem}{task.suffix}.log"
    written = {relative: atomic_write(folder / (log if relative == f"{stem}.log" else relative), data)
               for relative, data in output.files.items()}
    if result.status == "ok" and task.seeds is None:
        (folder / f"{stem}.failed.ipynb").unlink(missing_ok=True)  # it was older than this good run
    executed = written.get(f"{stem}.executed.ipynb") or written.get(f"{stem}.failed.ipynb")
    return replace(result, output=executed, log=written.get(f"{stem}.log"))

"""``mdbench reproduce --executor dask``: the notebooks run as tasks (:mod:`mdbench.tasks`) on a Dask cluster.

With ``--address tcp://HOST:8786`` the tasks go to the scheduler of a running cluster; without it a local cluster is
started for the run: one worker per GPU on a GPU profile (``CUDA_VISIBLE_DEVICES`` pins each worker, and so every
notebook it runs, to its GPU), else one worker per group of CPU cores a notebook uses (its ``threads`` parameter,
else one core). Every task asks for the resources it holds while it runs, ``GPU=1`` or ``CPU=<threads>``, so a
worker runs only as many notebooks at once as it has of them; on a cluster of your own, start each worker with its
resources (``dask worker ADDRESS --nthreads 1 --resources GPU=1``, with ``CUDA_VISIBLE_DEVICES`` set to its GPU). A
task that no worker could ever run is refused before anything runs.

No shared file system is assumed: each task gets its notebook (and, with ``--resume``, the results folder's stored
units of work) as bytes, runs in a workspace on its worker and sends back as bytes what the run made, which is written
here into the results folder, each file atomically. A notebook that fails or runs past its paper.yaml's
``timeout_minutes`` (stopped on the worker) sends back only its failed notebook, log and units of work; the summary
table is the local executor's, with one line per task (a shard's line names its seeds).

Faults: a task whose worker dies is run again on another worker (the scheduler's ``allowed-failures``, 3 by default),
and a task that raises is retried ``retries`` times; on the same machine the retry resumes from the units the first
attempt stored. On the workers, mdbench must be installed as here (the same code, so that stored units are reused),
and the data must lie at the same path (``--data-dir``).
"""
from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from mdbench import runner
from mdbench.progress import Display
from mdbench.runner import Interrupted, PaperNotebook, Profile, RunnerError, RunResult, result_line
from mdbench.tasks import STOP_POLL_S, Task, TaskOutput, plan, run_task, stored_units, write_outputs

POLL_S = 0.2
RETRIES = 2


def local_cluster(profile: Profile, n_workers: int | None = None, threads: int = 1):
    """A ``distributed.SpecCluster`` on this machine: ``n_workers`` workers (default: one per GPU on a GPU profile,
    else one per ``threads`` cores), each running one task at a time in a process of its own, with resources
    ``GPU=1`` and ``CUDA_VISIBLE_DEVICES`` set to its GPU, or ``CPU=threads``."""
    from distributed import Nanny, Scheduler, SpecCluster

    if profile.requires_gpu:
        import torch

        count = n_workers or torch.cuda.device_count()
        if count < 1:
            raise RunnerError(f"profile {profile.name!r} needs a CUDA GPU and torch sees none")
        specs = [({"GPU": 1}, {"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(count)]
    else:
        count = n_workers or max(1, (os.cpu_count() or 1) // threads)
        specs = [({"CPU": threads}, {"OMP_NUM_THREADS": str(threads)})] * count
    workers = {f"mdbench-{i}": {"cls": Nanny, "options": {"nthreads": 1, "resources": resources, "env": env,
                                                         "silence_logs": logging.ERROR, "dashboard": False}}
               for i, (resources, env) in enumerate(specs)}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0"}}  # any free port
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)


def check_resources(workers: dict[str, dict[str, Any]], tasks: list[Task], address: str) -> None:
    """Refuse tasks that no worker (``Client.scheduler_info()["workers"]``) has the resources for: they would wait
    for ever."""
    have = [info.get("resources") or {} for info in workers.values()]
    for task in tasks:
        if not any(all(own.get(k, 0) >= v for k, v in task.resources.items()) for own in have):
            needs = ",".join(f"{k}={v:g}" for k, v in task.resources.items())
            raise RunnerError(f"no worker of the cluster at {address} has the resources {needs} that {task.label} "
                              f"needs ({len(have)} worker(s)); start workers with --resources {needs}")


class StopEvent:
    """Whether the run's ``distributed.Event`` named ``name`` is set: what a task asks to know that the run that
    dispatched it was stopped (a thread on a worker cannot be cancelled; its notebook can be stopped)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> bool:
        from distributed import Event

        return Event(self.name).is_set()


def merge_task(task: Task, notebook: bytes, units: dict[str, bytes], run_id: str, data_dir: Path | None,
               stopped: StopEvent, *shards: TaskOutput) -> TaskOutput:
    """Run the merge ``task`` over the units of work its ``shards`` made, or say which shard did not end well."""
    bad = [s.task.label for s in shards if s.result.status != "ok"]
    if bad:
        result = RunResult(task.entry.paper, task.label, "not run", detail=f"shard(s) not ok: {', '.join(bad)}")
        return TaskOutput(task, result, {})
    for shard in shards:
        units = {**units, **{path.split("/", 1)[1]: data for path, data in shard.files.items()
                             if path.startswith("work/")}}
    return run_task(task, notebook, units, run_id, data_dir, resume=True, stopped=stopped)


def run_all(todo: list[PaperNotebook], profile: Profile, results_dir: Path, data_dir: Path | None, jobs: int,
            progress: bool, *, address: str | None = None, shards: int = 1, n_workers: int | None = None,
            retries: int = RETRIES) -> list[RunResult]:
    """Run the notebooks of ``todo`` as tasks on the cluster at ``address`` (default: a local one of
    ``n_workers``, see :func:`local_cluster`), each notebook's seeds split into ``shards``; the
    :func:`mdbench.runner.reproduce` step that runs the notebooks (``jobs`` is the cluster's to decide)."""
    from distributed import Client

    resume = bool(profile.parameters.get("resume"))
    profile = replace(profile, parameters={k: v for k, v in profile.parameters.items() if k != "resume"})
    tasks = [task for entry in todo for task in plan(entry, profile, shards)]
    if address is None:
        threads = max(int(task.resources.get("CPU", 1)) for task in tasks)
        client = Client(local_cluster(profile, n_workers, threads))
    else:
        client = Client(address)
    with client:
        check_resources(client.scheduler_info()["workers"], tasks, address or "this machine")
        return _gather(client, tasks, results_dir, data_dir, resume, retries)


def _gather(client, tasks: list[Task], results_dir: Path, data_dir: Path | None, resume: bool,
            retries: int) -> list[RunResult]:
    """Submit the tasks, write each one's outputs into the results folder as it ends, and return their results."""
    from distributed import Event, wait

    run_id = uuid.uuid4().hex[:12]
    stop_event = StopEvent(f"mdbench-{run_id}-stop")
    futures: dict[str, Any] = {}
    for task in tasks:
        folder = results_dir / task.entry.paper / task.profile.name
        args = (task, task.entry.notebook.read_bytes(), stored_units(folder) if resume else {}, run_id, data_dir)
        common = {"key": f"mdbench-{run_id}-{task.name}", "resources": task.resources, "retries": retries,
                  "pure": False}
        if task.shards:
            futures[task.name] = client.submit(merge_task, *args, stop_event, *(futures[s] for s in task.shards),
                                               **common)
        else:
            futures[task.name] = client.submit(run_task, *args, resume, stopped=stop_event, **common)
    by_name = {task.name: task for task in tasks}
    pending, done = dict(futures), []
    display = Display(live=False)  # a line per task as it ends: its notebook's log is on the worker until then
    with runner._signals_to_stop() as stop:
        while pending and not stop:
            for name, future in list(pending.items()):
                if future.done():
                    del pending[name]
                    done.append(_collect(by_name[name], future, results_dir))
                    display.finished(name, result_line(done[-1]))
            time.sleep(POLL_S)
        if stop:  # the running tasks stop their notebooks (and keep no records), then the rest is cancelled
            Event(stop_event.name, client=client).set()
            wait(list(pending.values()), timeout=STOP_POLL_S + runner.STOP_WAIT_S + 5)
            client.cancel(list(pending.values()), force=True)
            done += [RunResult(by_name[n].entry.paper, by_name[n].label, "interrupted",
                               detail=f"stopped by {signal.Signals(stop[0]).name}") for n in pending]
            raise Interrupted(stop[0], done)
    order = {task.label: i for i, task in enumerate(tasks)}
    return sorted(done, key=lambda r: order[r.notebook])  # as planned: a notebook's shards, then their merge


def _collect(task: Task, future, results_dir: Path) -> RunResult:
    """The task's result, its outputs written into the results folder; a task that raised or whose workers kept
    dying is a failed one, with the reason."""
    try:
        output: TaskOutput = future.result()
    except Exception as err:  # noqa: BLE001 - whatever ended the task on the cluster is that task's failure
        return RunResult(task.entry.paper, task.label, "failed", detail=f"{type(err).__name__}: {err}")
    return write_outputs(output, results_dir / task.entry.paper / task.profile.name)


def reproduce(*, address: str | None = None, shards: int = 1, n_workers: int | None = None,
              **kwargs: Any) -> list[RunResult]:
    """:func:`mdbench.runner.reproduce` (same arguments, checks, folder locks and claim summary) with the notebooks
    run as tasks on a Dask cluster: the one at ``address``, else a local one (of ``n_workers``); ``shards`` splits
    each notebook's seeds into that many tasks and merges them."""
    run: Callable[..., list[RunResult]] = partial(run_all, address=address, shards=shards, n_workers=n_workers)
    return runner.reproduce(run_all=run, **kwargs)

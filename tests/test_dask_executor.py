"""`mdbench reproduce --executor dask` on a local cluster of two worker processes: notebooks run as tasks, a
notebook's seeds sharded over both workers merge into the outcome of an unsharded run, and a worker killed mid-task
still ends with complete results. The notebooks are the template's experiment at smoke (tests/toy_papers.py)."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mdbench import cli, dask_executor, runner, tasks

from toy_papers import PARAMS, body, outcome, run_here, write_notebook, write_paper

ONE_SEED = PARAMS.replace("seeds = [0, 1, 2]", "seeds = [0]")  # "other": a notebook that --shards leaves whole


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("TOY_UNIT_S", "0")  # the workers' notebooks inherit it; a test changes it on the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from distributed import Client

    with dask_executor.local_cluster(runner.load_profile("smoke"), n_workers=2) as spec, Client(spec) as client:
        yield client


@pytest.fixture
def papers(tmp_path):
    folder = tmp_path / "papers"
    for order, (paper, params) in enumerate([("toy", PARAMS), ("other", ONE_SEED)], start=1):
        write_paper(folder, write_notebook(tmp_path / f"{paper}.ipynb", body(paper), params), paper=paper,
                    order=order)
    return folder


def _reproduce(cluster, papers: Path, results: Path, *names: str, shards: int = 1) -> list[runner.RunResult]:
    return dask_executor.reproduce(address=cluster.scheduler.address, shards=shards, papers=list(names),
                                   profile_name="smoke", results_dir=results, papers_dir=papers, progress=False,
                                   log=lambda line: None)


@pytest.mark.slow
def test_two_notebooks_at_once_one_of_them_sharded_give_the_outcome_of_unsharded_runs(cluster, papers, tmp_path,
                                                                                       monkeypatch):
    done = _reproduce(cluster, papers, tmp_path / "r", "toy", "other", shards=2)
    assert [(r.notebook, r.status) for r in done] == [
        ("toy.ipynb [seeds 0 2]", "ok"), ("toy.ipynb [seeds 1]", "ok"), ("toy.ipynb", "ok"), ("other.ipynb", "ok")], \
        runner.summary_table(done)
    for paper, params in (("toy", PARAMS), ("other", ONE_SEED)):
        expected = outcome(run_here(tmp_path / f"here-{paper}", monkeypatch, paper, params))
        assert outcome(tmp_path / "r" / paper / "smoke") == expected, paper
    merged = tmp_path / "r" / "toy" / "smoke"
    # the merge loaded every shard's unit and computed none; each shard's log is kept beside the merged run's
    executed = (merged / "toy.executed.ipynb").read_text()
    assert all(f"work seed seed={seed}: loaded" in executed for seed in (0, 1, 2))
    assert sorted(p.name for p in merged.glob("*.log")) == ["toy.log", "toy.seeds-0-2.log", "toy.seeds-1.log"]
    assert sorted(p.name for p in (merged / "work" / "seed").glob("*.pt")) == [f"seed={s}.pt" for s in (0, 1, 2)]
    assert not list((tmp_path / "r").rglob(".tmp-run-*"))


@pytest.mark.slow
def test_a_worker_killed_mid_task_ends_with_complete_results(cluster, papers, tmp_path, monkeypatch):
    cluster.run(os.environ.__setitem__, "TOY_UNIT_S", "2")  # two seconds a unit: time to kill its worker
    try:
        _kill_a_worker_mid_task(cluster, papers, tmp_path, monkeypatch)
    finally:
        cluster.run(os.environ.__setitem__, "TOY_UNIT_S", "0")


def _kill_a_worker_mid_task(cluster, papers, tmp_path, monkeypatch):
    results: list = []
    run = threading.Thread(target=lambda: results.extend(_reproduce(cluster, papers, tmp_path / "r", "toy")))
    run.start()
    deadline = time.monotonic() + 120
    stored: list[Path] = []
    while not stored and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
        stored = list((Path(tempfile.gettempdir()) / "mdbench-tasks").glob("*/toy/toy/smoke/work/seed/*.pt"))
    busy = [worker for worker, keys in cluster.processing().items() if keys]
    assert stored and busy, "the task never stored a unit"
    pid = cluster.run(os.getpid, workers=busy)[busy[0]]
    os.kill(pid, signal.SIGKILL)
    run.join(timeout=180)
    assert not run.is_alive()
    assert [(r.paper, r.status) for r in results] == [("toy", "ok")], runner.summary_table(results)
    folder = tmp_path / "r" / "toy" / "smoke"
    assert outcome(folder) == outcome(run_here(tmp_path / "here", monkeypatch))
    assert "work seed seed=0: loaded" in (folder / "toy.executed.ipynb").read_text()  # the retry resumed


@pytest.mark.slow
def test_the_command_on_a_cluster_of_its_own_stops_a_task_past_its_timeout_with_nothing_half_written(tmp_path,
                                                                                                      capsys):
    notebook = write_notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(600)", PARAMS)
    papers = write_paper(tmp_path / "papers", notebook, paper="slow", timeout_minutes=0.1)
    status = cli.main(["reproduce", "--executor", "dask", "--profile", "smoke", "--papers-dir", str(papers),
                       "--results-dir", str(tmp_path / "r"), "--quiet"])
    out = capsys.readouterr().out
    assert status == 1 and "slow.ipynb                   failed" in out and "timed out after 0.1 min" in out, out
    folder = tmp_path / "r" / "slow" / "smoke"
    left = {p.name for p in folder.iterdir()} - {runner.LOCK_NAME}
    assert "slow.log" in left and left <= {"slow.log", "slow.failed.ipynb"}  # no records, no executed notebook


def test_address_and_shards_need_the_dask_executor(capsys):
    assert cli.main(["reproduce", "--profile", "smoke", "--shards", "2"]) == 2
    assert "--address and --shards need --executor dask" in capsys.readouterr().err


def test_a_task_no_worker_can_run_is_refused_before_anything_runs(papers):
    gpu = runner.load_profile("gpu")
    entry = runner.select(runner.load_papers(papers), ["toy"])[0]
    [task] = tasks.plan(entry, gpu)
    with pytest.raises(runner.RunnerError, match=r"resources GPU=1 .*start workers with --resources GPU=1"):
        dask_executor.check_resources({"w": {"resources": {"CPU": 2}}}, [task], "tcp://x:8786")


def test_seeds_are_dealt_round_robin_and_a_notebook_without_seeds_is_one_task(papers, tmp_path):
    smoke = runner.load_profile("smoke")
    entry = runner.select(runner.load_papers(papers), ["toy"])[0]
    assert [(t.seeds, t.shards) for t in tasks.plan(entry, smoke, 2)] == [
        ((0, 2), ()), ((1,), ()), (None, ("toy.seeds-0-2", "toy.seeds-1"))]
    assert [t.seeds for t in tasks.plan(entry, smoke, 5)][:3] == [(0,), (1,), (2,)]
    plain = write_paper(tmp_path / "plain", write_notebook(tmp_path / "p.ipynb", "pass"), paper="plain")
    assert len(tasks.plan(runner.load_papers(plain)[0], smoke, 2)) == 1
    with pytest.raises(runner.RunnerError, match="--shards must be at least 1"):
        tasks.plan(entry, smoke, 0)

"""`mdbench reproduce --resume` end to end: a run stopped after some units of work, started again with --resume,
ends with the records, per-sample outputs, table and claims of an uninterrupted run, and computes none of the units
the stopped run had stored."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mdbench import runner

from toy_papers import BODY, PARAMS, outcome, run_here, write_notebook, write_paper

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_resume_reaches_every_notebook_as_a_parameter_it_must_declare(tmp_path, monkeypatch):
    # a fake papermill that keeps the parameters it was given
    script = "import shutil, sys; shutil.copy(sys.argv[2], sys.argv[1] + '.params')"
    monkeypatch.setattr(runner, "papermill_command", lambda notebook, output, params_file: [
        sys.executable, "-c", script, str(tmp_path / "given"), str(params_file)])
    papers = write_paper(tmp_path / "papers", write_notebook(tmp_path / "toy.ipynb", "pass", PARAMS))
    runner.reproduce(profile_name="smoke", results_dir=tmp_path / "results", papers_dir=papers, progress=False,
                     log=lambda line: None, resume=True)
    assert yaml.safe_load((tmp_path / "given.params").read_text()) == {"profile": "smoke", "device": "cpu",
                                                                       "resume": True}
    runner.reproduce(profile_name="smoke", results_dir=tmp_path / "results", papers_dir=papers, progress=False,
                     log=lambda line: None)
    assert "resume" not in yaml.safe_load((tmp_path / "given.params").read_text())
    old = write_paper(tmp_path / "old", write_notebook(tmp_path / "old.ipynb", "pass"))  # declares no resume
    with pytest.raises(runner.RunnerError, match=r"unknown parameter\(s\) \['resume'\]"):
        runner.reproduce(profile_name="smoke", results_dir=tmp_path / "results", papers_dir=old, resume=True)


def _reproduce(papers: Path, results: Path, unit_s: float, *resume: str) -> subprocess.Popen:
    env = {**os.environ, "TOY_UNIT_S": str(unit_s), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mdbench.cli", "reproduce", "--papers-dir", str(papers),
                             "--profile", "smoke", "--quiet", "--results-dir", str(results), *resume],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(run: subprocess.Popen, timeout: float = 120) -> str:
    out, err = run.communicate(timeout=timeout)
    assert run.returncode == 0, out + err
    return out


def _computed(results: Path) -> list[int]:
    path = results / "computed.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_a_stopped_run_resumed_ends_as_an_uninterrupted_one_without_repeating_stored_units(tmp_path, monkeypatch):
    papers = write_paper(tmp_path / "papers", write_notebook(tmp_path / "toy.ipynb", BODY, PARAMS))
    stopped = tmp_path / "stopped"
    run = _reproduce(papers, stopped, 3)  # three seconds a unit: time to stop it after its first
    units = stopped / "toy" / "smoke" / "work" / "seed"
    deadline = time.monotonic() + 90
    while not list(units.glob("*.pt")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, out + err
    stored = sorted(p.name for p in units.glob("*.pt"))
    assert stored and len(stored) < 3 and not (stopped / "toy" / "smoke" / "table1.csv").exists()
    before = _computed(stopped)
    assert before[: len(stored)] == list(range(len(stored)))  # the stored units, then the one that was stopped

    resumed = _finish(_reproduce(papers, stopped, 0, "--resume"))
    assert _computed(stopped)[len(before):] == list(range(len(stored), 3))  # only the units not stored
    assert outcome(stopped / "toy" / "smoke") == outcome(run_here(tmp_path / "whole", monkeypatch))
    executed = (stopped / "toy" / "smoke" / "toy.executed.ipynb").read_text()
    assert "work seed seed=0: loaded" in executed, resumed

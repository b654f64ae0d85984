"""`mdbench reproduce --resume` end to end: a run stopped after some units of work, started again with --resume,
ends with the records, per-sample outputs, table and claims of an uninterrupted run, and computes none of the units
the stopped run had stored."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mdbench import runner, samples

from toy_papers import write_notebook, write_paper

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS = "profile = 'smoke'\ndevice = 'cpu'\nresume = False\nseeds = [0, 1, 2]\nn_train = 96\nn_test = 48\nepochs = 2"
# The template's experiment, one unit of work per seed; each unit says that it ran and takes TOY_UNIT_S seconds more.
BODY = """\
import os, pathlib, time
from functools import partial
import pandas as pd
from mdbench import notebook, results, verdicts
from mdbench.papers._template import experiment as exp

session = notebook.start("toy", notebook.parameters(globals()), exp.Config)
cfg, data = session.config, exp.load_data(session.config)

def unit(seed):
    with open(pathlib.Path(os.environ["MDBENCH_RESULTS_DIR"]) / "computed.txt", "a") as log:
        log.write(f"{seed}\\n")
    outputs = exp.run(data, cfg, seed)
    time.sleep(float(os.environ["TOY_UNIT_S"]))
    return outputs

outputs = pd.concat([session.work("seed", partial(unit, seed), seed=seed) for seed in cfg.seeds], ignore_index=True)
session.record_frame("table1", exp.record(outputs), dataset=data.name, dataset_checksum=data.checksum,
                     config=cfg.as_record(), samples=outputs)
reference = results.load_reference("_template")
session.save_table(results.build_table(reference, session.store.records(), "table1"), "table1")
session.save_table(verdicts.evaluate_claims(reference, session.store.records(), session.store.samples), "claims")
"""


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


def _run_here(results: Path, monkeypatch) -> Path:
    """The toy notebook's code run to its end in this process (no papermill, no kernel: seconds); its folder."""
    results.mkdir()
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(results))
    monkeypatch.setenv("TOY_UNIT_S", "0")
    namespace: dict = {}
    exec(PARAMS, namespace)  # noqa: S102 - the test's own notebook
    try:
        exec(BODY, namespace)  # noqa: S102
    finally:
        torch.use_deterministic_algorithms(False)  # the session turned them on for the smoke profile
    return results / "toy" / "smoke"


def _outcome(folder: Path) -> dict:
    """Everything a run decided, without when and where it ran: each record, its per-sample outputs, the table and
    the claims."""
    outcome = {}
    for path in sorted((folder / "records").glob("*.json")):
        record = json.loads(path.read_text())
        outcome[path.name] = {k: v for k, v in record.items() if k not in ("fingerprint", "time")}
    for path in sorted((folder / "records").glob(f"*{samples.SUFFIX}")):
        outcome[path.name] = samples.read(path).to_dict("list")
    for name in ("table1.csv", "claims.csv"):
        outcome[name] = pd.read_csv(folder / name, keep_default_na=False).to_dict("list")  # empty cells stay ""
    return outcome


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
    assert _outcome(stopped / "toy" / "smoke") == _outcome(_run_here(tmp_path / "whole", monkeypatch))
    executed = (stopped / "toy" / "smoke" / "toy.executed.ipynb").read_text()
    assert "work seed seed=0: loaded" in executed, resumed

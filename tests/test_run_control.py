"""Run control of `mdbench reproduce`: guard processes, the results-folder lock, signals, temporary files, full disks,
the data folder and the exit status.

The fast tests replace papermill by a small fake command (``runner.papermill_command``); the ``slow`` ones run a real
papermill and Jupyter kernel on a toy notebook that sleeps, to check that nothing of a stopped or killed run survives.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import yaml

from mdbench import cli, process_guard, runner

from toy_papers import write_notebook, write_paper

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = "profile = 'smoke'\ndevice = 'cpu'\ndata_dir = None"
# The toy notebook of the slow tests: says which process its kernel is, then sleeps far longer than any test waits.
SLEEPER = """\
import os, pathlib, time
marks = pathlib.Path(os.environ["MDBENCH_RESULTS_DIR"])
(marks / "kernel.pid.tmp").write_text(str(os.getpid()))
os.replace(marks / "kernel.pid.tmp", marks / "kernel.pid")
time.sleep(120)
(marks / "done").write_text("the notebook ran to its end")
"""


def _fake_papermill(monkeypatch, script: str) -> None:
    """Run ``script`` instead of papermill, with argv [output notebook, params file]."""
    monkeypatch.setattr(runner, "papermill_command",
                        lambda notebook, output, params_file: [sys.executable, "-c", textwrap.dedent(script),
                                                               str(output), str(params_file)])


# A fake papermill that writes a good executed notebook and logs what it was given.
FAKE_OK = """
import json, os, sys
out, params = sys.argv[1:]
with open(out, "w") as nb:
    json.dump({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}, nb)
with open(os.path.join(os.environ["MDBENCH_RESULTS_DIR"], "calls.jsonl"), "a") as log:
    log.write(json.dumps({"output": out, "params": open(params).read(),
                          "env_data_dir": os.environ.get("MDBENCH_DATA_DIR"),
                          "env_verify_data": os.environ.get("MDBENCH_VERIFY_DATA")}) + "\\n")
"""

# A fake papermill on a full disk: the notebook is cut off mid-JSON and so is the traceback on stderr.
FAKE_FULL_DISK = """
import sys
out = sys.argv[1]
open(out, "w").write('{"cells": [{"cell_type": "code", "sou')
sys.stderr.write("Executing notebook with kernel: python3\\n"
                 "Traceback (most recent call last):\\n"
                 '  File "papermill/iorw.py", line 160, in write\\n'
                 f"OSError: [Errno 28] No space left on device: '{out}'\\n\\n"
                 "During handling of the above exception, another exception occurred:\\n\\n"
                 "Traceback (most recent call last):\\n"
                 '  File "/usr/lib/python3.11/json/enc')
sys.exit(1)
"""


def _calls(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "calls.jsonl").read_text().splitlines()]


def _reproduce(tmp_path: Path, notebook: Path, **kwargs):
    return runner.reproduce(profile_name=kwargs.pop("profile_name", "smoke"), results_dir=tmp_path / "results",
                            papers_dir=write_paper(tmp_path / "papers", notebook),
                            progress=False, log=lambda *_: None, **kwargs)


# ------------------------------------------------------------------------------------------------ data folder
def test_data_dir_flag_wins_over_the_env_var_and_reaches_the_notebook(tmp_path, monkeypatch):
    flag_dir, env_dir = tmp_path / "flag-data", tmp_path / "env-data"
    flag_dir.mkdir()
    env_dir.mkdir()
    monkeypatch.setenv("MDBENCH_DATA_DIR", str(env_dir))
    _fake_papermill(monkeypatch, FAKE_OK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    [result] = _reproduce(tmp_path, notebook, data_dir=flag_dir)
    assert result.status == "ok", result.detail
    [call] = _calls(tmp_path / "results")
    assert yaml.safe_load(call["params"])["data_dir"] == str(flag_dir)
    assert call["env_data_dir"] == str(flag_dir)


def test_data_dir_is_not_injected_into_a_notebook_without_that_parameter(tmp_path, monkeypatch):
    _fake_papermill(monkeypatch, FAKE_OK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", params="profile = 'smoke'\ndevice = 'cpu'")
    [result] = _reproduce(tmp_path, notebook, data_dir=tmp_path)
    assert result.status == "ok", result.detail
    [call] = _calls(tmp_path / "results")
    assert "data_dir" not in yaml.safe_load(call["params"]) and call["env_data_dir"] == str(tmp_path)


def test_no_verify_data_flag_reaches_the_notebook_process(tmp_path, monkeypatch):
    monkeypatch.delenv("MDBENCH_VERIFY_DATA", raising=False)  # restored after the test: the CLI sets it
    _fake_papermill(monkeypatch, FAKE_OK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    args = ["reproduce", "--profile", "smoke", "--quiet", "--results-dir", str(tmp_path / "results"),
            "--papers-dir", str(write_paper(tmp_path / "papers", notebook))]
    assert cli.main(args) == 0 and _calls(tmp_path / "results")[-1]["env_verify_data"] is None
    assert cli.main([*args, "--no-verify-data"]) == 0
    assert _calls(tmp_path / "results")[-1]["env_verify_data"] == "0"


def test_missing_data_dir_is_an_error_at_once(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    assert cli.main(["reproduce", "--paper", "quickstart", "--profile", "cpu", "--data-dir", str(missing),
                     "--results-dir", str(tmp_path / "results")]) == 2
    assert f"--data-dir {missing} does not exist" in capsys.readouterr().err


def test_nothing_to_run_fails_with_the_reason_and_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    assert cli.main(["reproduce", "--profile", "cpu", "--quiet", "--results-dir", str(tmp_path / "results")]) == 2
    out, err = capsys.readouterr()
    # one reason for all five notebooks, and the command-line flags that fix it
    assert err.strip() == ("mdbench: error: nothing to run at profile cpu: profile 'cpu' needs real data: pass "
                           "--data-dir DIR (or set MDBENCH_DATA_DIR) to the folder that holds the datasets, or use "
                           "--profile smoke (synthetic data)")
    assert out == "" and not (tmp_path / "results" / "summary.csv").exists()


def test_a_run_with_something_to_run_reports_the_skipped_notebooks(tmp_path, monkeypatch):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    _fake_papermill(monkeypatch, FAKE_OK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", params="profile = 'cpu'\ndevice = 'cpu'\ndata_dir = None")
    write_paper(tmp_path / "papers", notebook, paper="needs_data", datasets=["pbc"], order=1)
    write_paper(tmp_path / "papers", notebook, paper="synthetic", order=2)
    results = runner.reproduce(profile_name="cpu", results_dir=tmp_path / "results", papers_dir=tmp_path / "papers",
                               progress=False, log=lambda *_: None)
    assert [(r.paper, r.status) for r in results] == [("needs_data", "skipped"), ("synthetic", "ok")]
    assert "pass --data-dir DIR (or set MDBENCH_DATA_DIR)" in results[0].detail


# A fake papermill whose notebook judged three claims, as notebook.finish writes them beside the records.
FAKE_WITH_CLAIMS = FAKE_OK + """
from pathlib import Path
(Path(out).parent / "claims.csv").write_text("claim,status\\nc1,holds\\nc2,inconclusive (n=1)\\nc3,does not hold\\n")
"""


def test_the_summary_ends_with_the_output_paths_the_claim_tally_and_the_run_folder(tmp_path, monkeypatch, capsys):
    _fake_papermill(monkeypatch, FAKE_WITH_CLAIMS)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    results = tmp_path / "results"
    assert cli.main(["reproduce", "--profile", "smoke", "--quiet", "--results-dir", str(results),
                     "--papers-dir", str(write_paper(tmp_path / "papers", notebook))]) == 0
    out = capsys.readouterr().out
    folder = results / "toy" / "smoke"
    assert out.startswith("profile smoke: 1 notebook(s) to run")
    assert "\nok     toy" in out  # --quiet: one line for the notebook as it ended, no live status
    summary, where = out.rstrip().rsplit("\n\noutputs of this run: ", 1)
    assert where.startswith(f"{results}\ncompare with the reference: mdbench compare ")  # last: where it all went
    assert where.endswith(f" {results} --profile smoke")
    assert summary.endswith(
        "outputs:\n"
        f"  toy          {folder / 'nb.executed.ipynb'}  (log: {folder / 'nb.log'})\n"
        f"  claims       {results / 'summary.csv'} (tally: {results / 'summary.md'})\n"
        "\n"
        "claims at profile smoke:\n"
        "paper  holds  does not hold  inconclusive  not run\n"
        "  toy      1              1             1        0")


# ----------------------------------------------------------------------------------------- lock and duplicates
def test_duplicate_papers_are_run_once_in_the_order_given():
    chosen = runner.select(runner.load_papers(), ["efcm", "quickstart", "efcm"])
    assert [e.paper for e in chosen] == ["efcm", "quickstart"]


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_second_run_into_a_folder_is_refused_and_kill_9_frees_it(tmp_path):
    folder = tmp_path / "results" / "toy" / "smoke"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mdbench.runner import folder_lock\n"
                               "with folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n"
                               "    time.sleep(60)", str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
        in_use = re.escape(f"results folder {folder} is in use by another mdbench reproduce (pid {holder.pid})")
        with pytest.raises(runner.RunnerError, match=in_use):
            _reproduce(tmp_path, notebook)
        holder.kill()
        holder.wait()
        with runner.folder_lock(folder):  # the kernel dropped the dead holder's lock
            pass
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------ files
def test_temp_names_are_unique_per_run_and_leftovers_of_a_killed_run_are_removed(tmp_path, monkeypatch):
    _fake_papermill(monkeypatch, FAKE_OK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    folder = tmp_path / "results" / "toy" / "smoke"
    (folder / "records").mkdir(parents=True)
    stale = [folder / ".tmp-run-nb-deadbeef.ipynb", folder / ".tmp-run-nb-deadbeef-params.yaml",
             folder / "records" / ".tmp-k3j4h5g6.json"]  # a kernel killed inside mdbench.io.atomic_write
    for path in stale:
        path.write_text('{"cut off')
    for _ in range(2):
        [result] = _reproduce(tmp_path, notebook)
        assert result.status == "ok", result.detail
    first, second = (Path(c["output"]).name for c in _calls(tmp_path / "results"))
    assert first != second and first.startswith(".tmp-run-nb-") and first != ".tmp-nb.ipynb"
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-reproduce.lock", "nb.executed.ipynb", "nb.log",
                                                        "records"]
    assert oct((folder / "nb.executed.ipynb").stat().st_mode & 0o777) == "0o644"


def test_a_good_run_removes_the_stale_failed_notebook(tmp_path, monkeypatch):
    _fake_papermill(monkeypatch, FAKE_OK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    stale = tmp_path / "results" / "toy" / "smoke" / "nb.failed.ipynb"
    stale.parent.mkdir(parents=True)
    stale.write_text("an older failure")
    [result] = _reproduce(tmp_path, notebook)
    assert result.status == "ok" and result.output.name == "nb.executed.ipynb"
    assert not stale.exists()


def test_full_disk_keeps_no_truncated_notebook_and_reports_the_oserror(tmp_path, monkeypatch):
    _fake_papermill(monkeypatch, FAKE_FULL_DISK)
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    folder = tmp_path / "results" / "toy" / "smoke"
    folder.mkdir(parents=True)
    (folder / "nb.failed.ipynb").write_text("an older failure")
    (folder / "nb.executed.ipynb").write_text("last good run")
    [result] = _reproduce(tmp_path, notebook)
    assert result.status == "failed"
    assert result.detail.startswith(f"OSError: [Errno 28] No space left on device: '{folder}/.tmp-run-nb-")
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-reproduce.lock", "nb.executed.ipynb", "nb.log"]
    assert (folder / "nb.executed.ipynb").read_text() == "last good run"
    assert result.output == result.log == folder / "nb.log"


def test_stderr_reason_prefers_the_oserror_over_a_cut_off_last_line():
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
            "OSError: [Errno 28] No space left on device: '/r/nb.ipynb'\n\nDuring handling...\n  File \"/usr/li")
    assert runner.stderr_reason(text) == "OSError: [Errno 28] No space left on device: '/r/nb.ipynb'"
    assert runner.stderr_reason("a\nValueError: bad\n") == "ValueError: bad"
    assert runner.stderr_reason("") == ""


def test_a_disk_already_full_names_the_folder(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(runner.RunnerError, match=re.escape(
            f"results folder {tmp_path / 'results'} cannot be written: No space left on device")):
        _reproduce(tmp_path, notebook)


# ------------------------------------------------------------------------------------------------ the guard
TREE = """
import os, subprocess, sys, time
# a grandchild in a session of its own, as jupyter_client starts the kernel
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
if os.environ.get("TREE_PIDS"):
    with open(os.environ["TREE_PIDS"], "w") as out:
        out.write(f"{os.getpid()} {child.pid}")
if os.environ.get("TREE_EXIT"):  # as papermill dying with its kernel still running
    sys.exit(int(os.environ["TREE_EXIT"]))
time.sleep(60)
"""


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _all_gone(procs: list[psutil.Process]) -> bool:
    def gone(p):
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(gone(p) for p in procs)


def _pids_gone(pids: list[int]) -> bool:
    """Whether none of ``pids`` is a live process of TREE (a reused pid runs something else)."""
    procs = []
    for pid in pids:
        try:
            if "time.sleep(60)" in " ".join(psutil.Process(pid).cmdline()):
                procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return _all_gone(procs)


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_guard_takes_its_tree_down_when_stopped():
    guard = subprocess.Popen(process_guard.guard_command([sys.executable, "-c", TREE]), start_new_session=True)
    tree = _wait_for(lambda: len(_descendants(guard.pid)) == 2 and _descendants(guard.pid), 20, "the tree")
    try:
        guard.terminate()
        assert guard.wait(timeout=15) == 128 + signal.SIGTERM
        _wait_for(lambda: _all_gone(tree), 10, "the guarded tree to end")
    finally:
        _kill_all(tree)
        guard.kill()


def test_guard_kills_what_its_command_left_behind_and_returns_its_status(tmp_path):
    pid_file = tmp_path / "tree.pids"
    guard = subprocess.Popen(process_guard.guard_command([sys.executable, "-c", TREE]), start_new_session=True,
                             env={**os.environ, "TREE_PIDS": str(pid_file), "TREE_EXIT": "3"})
    assert guard.wait(timeout=20) == 3
    pids = [int(pid) for pid in pid_file.read_text().split()]
    try:
        _wait_for(lambda: _pids_gone(pids), 10, "the orphaned grandchild to end")
    finally:
        _kill_all([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)])


def test_guard_takes_its_tree_down_when_its_owner_is_killed_with_kill_9():
    owner = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; from mdbench.process_guard import guard_command\n"
                               "subprocess.Popen(guard_command([sys.executable, '-c', sys.argv[1]]), "
                               "start_new_session=True)\ntime.sleep(60)", TREE])
    tree = _wait_for(lambda: len(_descendants(owner.pid)) == 3 and _descendants(owner.pid), 20, "the tree")
    try:
        owner.kill()
        owner.wait()
        _wait_for(lambda: _all_gone(tree), 10, "the guarded tree to end after its owner died")
    finally:
        _kill_all(tree)


@pytest.mark.slow
def test_timeout_stops_the_whole_tree(tmp_path, monkeypatch):
    _fake_papermill(monkeypatch, TREE)
    monkeypatch.setenv("TREE_PIDS", str(tmp_path / "tree.pids"))
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass", SMOKE_PARAMS)
    papers_dir = write_paper(tmp_path / "papers", notebook, timeout_minutes=0.1)  # 6 s: time enough to start
    [result] = runner.reproduce(profile_name="smoke", results_dir=tmp_path / "results", papers_dir=papers_dir,
                                progress=False, log=lambda *_: None)
    assert result.status == "failed" and result.detail == "timed out after 0.1 min"
    pids = [int(pid) for pid in (tmp_path / "tree.pids").read_text().split()]
    _wait_for(lambda: _pids_gone(pids), 10, "the fake papermill and its grandchild to end")


# --------------------------------------------------------------------- real papermill and kernel (slow)
def _start_parent(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`mdbench reproduce` of the sleeper notebook in a process of its own; returns it and its results folder."""
    notebook = write_notebook(tmp_path / "sleeper.ipynb", SLEEPER, SMOKE_PARAMS)
    results = tmp_path / "results"
    parent = subprocess.Popen([sys.executable, "-m", "mdbench.cli", "reproduce", "--papers-dir",
                               str(write_paper(tmp_path / "papers", notebook)), "--profile", "smoke", "--quiet",
                               "--results-dir", str(results)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    return parent, results


def _run_tree(parent: subprocess.Popen, results: Path) -> list[psutil.Process]:
    """The kernel of the running notebook and its ancestors below ``parent`` (papermill, the guard)."""
    pid_file = results / "kernel.pid"
    _wait_for(lambda: pid_file.exists() or parent.poll() is not None, 60, "the kernel to start")
    assert parent.poll() is None, parent.communicate()
    kernel = psutil.Process(int(pid_file.read_text()))
    tree = [kernel] + [p for p in kernel.parents() if p.pid != parent.pid and parent.pid in
                       {q.pid for q in p.parents()}]
    assert any("papermill" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
    return tree


@pytest.mark.slow
def test_kill_9_of_mdbench_takes_papermill_and_its_kernel_down(tmp_path):
    parent, results = _start_parent(tmp_path)
    tree = []
    try:
        tree = _run_tree(parent, results)
        parent.kill()
        parent.communicate()
        _wait_for(lambda: _all_gone(tree), 10, "papermill and the kernel to end after kill -9 of mdbench")
        folder = results / "toy" / "smoke"
        assert not (results / "done").exists() and not list(folder.glob("*.executed.ipynb"))
        with runner.folder_lock(folder):  # free for the next run, which removes the temporary files
            pass
    finally:
        _kill_all(tree)
        parent.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_at_once_with_a_summary_and_no_leftovers(tmp_path, sig):
    parent, results = _start_parent(tmp_path)
    tree = []
    try:
        tree = _run_tree(parent, results)
        parent.send_signal(sig)  # to mdbench alone, not to its process group
        _wait_for(lambda: parent.poll() is not None, 15, "mdbench to stop")
        out, err = parent.communicate()
        assert parent.returncode == 128 + sig
        assert "Traceback" not in err and f"interrupted by {sig.name}" in err
        assert "sleeper.ipynb" in out and "interrupted" in out
        assert f"  toy          {results / 'toy' / 'smoke' / 'sleeper.log'}" in out  # where it got to
        _wait_for(lambda: _all_gone(tree), 5, "papermill and the kernel to end")
        folder = results / "toy" / "smoke"
        # the stopped notebook's live log stays, to say how far it got; nothing else of it does
        assert sorted(p.name for p in folder.iterdir()) == [".tmp-reproduce.lock", "sleeper.log"]
        assert "Executing Cell" in (folder / "sleeper.log").read_text()
        assert not (results / "done").exists()
    finally:
        _kill_all(tree)
        parent.kill()


@pytest.mark.slow
def test_the_notebook_reads_the_data_dir_of_the_flag(tmp_path, monkeypatch):
    flag_dir, env_dir = tmp_path / "flag-data", tmp_path / "env-data"
    flag_dir.mkdir()
    env_dir.mkdir()
    monkeypatch.setenv("MDBENCH_DATA_DIR", str(env_dir))
    notebook = write_notebook(tmp_path / "nb.ipynb", "import os\nprint(data_dir, os.environ['MDBENCH_DATA_DIR'])",
                              SMOKE_PARAMS)
    [result] = _reproduce(tmp_path, notebook, data_dir=flag_dir)
    assert result.status == "ok", result.detail
    executed = nbformat.read(result.output, as_version=4)
    assert executed.cells[-1].outputs[0]["text"].split() == [str(flag_dir), str(flag_dir)]

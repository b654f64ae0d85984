"""Execute the paper notebooks with papermill at a profile: the engine behind ``mdbench reproduce``.

Each notebook runs in its own papermill process (so a timeout can stop it and ``--jobs`` can run several), with the
profile's parameters injected into the cell tagged ``parameters``. The executed notebook and its log are kept in
``results/<paper>/<profile>/``; a notebook that fails is kept as ``<name>.failed.ipynb`` and never replaces the last
good ``<name>.executed.ipynb``.

Run control (Linux first; where noted, other platforms get less):

* **One run per results folder.** ``reproduce`` holds an exclusive ``flock`` on ``<folder>/.tmp-reproduce.lock`` for
  every notebook it runs; another run into the same folder is refused at once, naming the folder and the holder's
  pid. The operating system drops the lock when its holder dies, even by ``kill -9``. (No lock where ``fcntl`` is
  missing.)
* **Nothing outlives the run.** papermill runs under a guard process (:func:`mdbench.process_guard.guard`) in a
  session of its own. The guard is a child subreaper (Linux), so the Jupyter kernel, which jupyter_client starts in yet another session, stays its
  descendant even if papermill dies first. When the guard is told to stop (SIGTERM, SIGINT, SIGHUP) or sees that the
  mdbench process that started it is gone (also after ``kill -9``; it polls its parent pid), it kills all its
  descendants and exits, so no notebook of a dead run goes on writing records or tables.
* **Signals.** SIGINT (Ctrl-C) and SIGTERM stop every running notebook within seconds, remove the run's temporary
  files, and ``reproduce`` raises :class:`Interrupted` carrying the summary so far (running notebooks ``interrupted``,
  the rest ``not run``); ``mdbench reproduce`` prints it and exits 130 (SIGINT) or 143 (SIGTERM).
* **Files.** Temporary files have names unique to the run (``.tmp-run-<name>-*``); the executed notebook and the
  failed notebook reach their final names by ``os.replace``, without Jupyter widget state (:func:`without_widgets`). A
  good run removes a stale ``<name>.failed.ipynb``. ``<name>.log`` is the live log of the notebook's latest run
  (papermill's ``--log-output``: each cell as it starts and everything it prints, then papermill's own errors); it is
  written in place, so that ``tail -f`` can follow it, and kept when the run is stopped. A notebook papermill could
  not write whole (a full disk) is not kept; the reason reported is then the OSError in the log
  (``[Errno 28] No space left on device: '<path>'``), not the last line of a cut-off traceback.
  Temporary files a killed run left (its own and half-written records of its kernel) are removed by the next run that
  holds the folder's lock, and by each run when it ends.
* **Resume.** With ``resume`` every notebook gets the parameter ``resume=True``: its session loads the units of work
  (seeds, folds, rows) a former run of the same config and code stored under ``<folder>/work/`` instead of computing
  them (:mod:`mdbench.work`). Every run stores its units there, and neither a failure nor a signal removes them, so an
  interrupted run started again with ``resume`` loses only its unfinished units.
* **Nothing to run is an error.** When every selected notebook would be skipped (no GPU, no data), ``reproduce``
  raises :class:`RunnerError` with the reason and the command lines that would run, instead of succeeding having run
  nothing.
* **Progress.** While notebooks run, :class:`mdbench.progress.Display` shows each one's section, cell, time spent
  and the time its paper.yaml expects, read from its live log.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from mdbench.paper_yaml import PAPERS_DIR, PaperFileError, known_papers, paper_file, read_paper_file, require
from mdbench.process_guard import POLL_S, guard_command, kill_descendants
from mdbench.progress import Display, NotebookProgress, Status

if TYPE_CHECKING:
    from mdbench.params import NotebookConfig

C = TypeVar("C", bound="NotebookConfig")

try:
    import fcntl
except ImportError:  # not POSIX: runs into one folder are not serialised
    fcntl = None  # type: ignore[assignment]  # checked before each use

# nbformat, papermill, pandas and torch (through mdbench.results) are imported where they are used, to keep the CLI
# quick to start (tests/test_cli.py checks it).

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
KERNEL = "python3"
TMP_PREFIX = ".tmp-run-"  # the runner's temporary files; mdbench.io.atomic_write uses ".tmp-" + 8 random chars
LOCK_NAME = ".tmp-reproduce.lock"  # ".tmp" so that git ignores it beside the results
STOP_WAIT_S = 10.0  # how long the runner waits for a guard to stop before killing its tree itself
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # an output that displays a Jupyter widget


class RunnerError(ValueError):
    """Bad input to the runner: unknown paper or profile, unknown parameter, folder in use."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped :func:`reproduce`; ``results`` says what finished, was interrupted or never ran."""

    def __init__(self, signum: int, results: list[RunResult]):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.results = results


# --------------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """What a profile shares across papers (``mdbench/profiles/<name>.yaml``); each paper's own values at the
    profile are in its paper.yaml, except at a ``notebook_defaults`` profile (smoke), which runs the notebooks'
    own defaults."""

    name: str
    description: str
    requires_gpu: bool
    real_data: bool
    deterministic: bool
    notebook_defaults: bool
    parameters: dict[str, Any]


def available_profiles() -> list[str]:
    """The names of the profiles in ``mdbench/profiles/``."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    """The profile ``name``; an unknown one is an error that lists the available ones."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        raise RunnerError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return Profile(name=data["name"], description=data.get("description", ""),
                       requires_gpu=bool(data.get("requires_gpu", False)),
                       real_data=bool(data.get("real_data", False)),
                       deterministic=bool(data.get("deterministic", True)),
                       notebook_defaults=bool(data.get("notebook_defaults", False)),
                       parameters=data.get("parameters") or {})
    except KeyError as err:
        raise RunnerError(f"profile file {path} lacks the key {err}") from err


# ----------------------------------------------------------------------------------------------------- papers
@dataclass(frozen=True)
class PaperNotebook:
    """How ``reproduce`` runs one paper's notebook: the ``reproduce`` section of its paper.yaml.

    ``title`` is the paper's (the file's top-level ``title``); the rest is the ``reproduce`` section:
    ``order`` (an integer: papers run by ascending order; gaps leave room for a new paper), ``notebook`` (its file
    under ``notebooks/``; tests give an absolute path), ``tier`` (``paper``: reproduces a paper's tables;
    ``walkthrough``: building blocks for students), ``datasets`` (the real datasets a ``real_data`` profile needs
    under the data folder), ``minutes`` (expected wall time per profile: 2 CPU cores for smoke and cpu, one H100 for
    gpu), ``timeout_minutes`` (per profile: the notebook is stopped and reported failed past it) and ``parameters``
    (per profile, the values papermill injects besides the profile's shared ones; every profile but a
    ``notebook_defaults`` one has them).
    """

    paper: str
    title: str
    order: int
    notebook: Path
    tier: str
    datasets: tuple[str, ...]
    minutes: dict[str, float]
    timeout_minutes: dict[str, float]
    parameters: dict[str, dict[str, Any]]

    def timeout_s(self, profile: str) -> float:
        """Seconds the notebook may run at ``profile``."""
        return 60.0 * float(self.timeout_minutes[profile])

    def parameters_for(self, profile: Profile) -> dict[str, Any]:
        """The profile's shared parameters, then this paper's own at that profile."""
        return {**profile.parameters, **self.parameters.get(profile.name, {})}


def load_papers(papers_dir: Path = PAPERS_DIR) -> list[PaperNotebook]:
    """Every paper under ``papers_dir``, in the order ``reproduce`` runs them."""
    profiles = [load_profile(name) for name in available_profiles()]
    papers = sorted((_paper_notebook(paper_file(name, papers_dir), profiles) for name in known_papers(papers_dir)),
                    key=lambda p: p.order)
    for first, second in zip(papers, papers[1:], strict=False):
        if first.order == second.order:  # their order would depend on their names
            raise PaperFileError(f"papers {first.paper} and {second.paper} (in {papers_dir}) both have reproduce.order "
                                 f"{first.order}; give each paper its own")
    return papers


def _paper_notebook(path: Path, profiles: list[Profile]) -> PaperNotebook:
    """The title and ``reproduce`` section of the paper.yaml at ``path``; a missing key is an error naming the file
    and key."""
    data = read_paper_file(path)
    section = require(data, "reproduce", path)

    def get(key: str) -> Any:
        return require(section, key, path, "reproduce")

    order, parameters = get("order"), get("parameters") or {}
    if not isinstance(order, int) or isinstance(order, bool):
        raise PaperFileError(f"{path}: reproduce.order must be an integer, not {order!r}")
    names = [profile.name for profile in profiles]
    for key in ("minutes", "timeout_minutes"):
        for name in names:
            require(get(key), name, path, f"reproduce.{key}")
    for profile in profiles:
        if profile.notebook_defaults and profile.name in parameters:
            raise PaperFileError(f"{path}: reproduce.parameters.{profile.name} must go: the {profile.name} profile "
                                 "runs the notebook's own defaults, so change them in its parameters cell")
        if not profile.notebook_defaults:
            require(parameters, profile.name, path, "reproduce.parameters")
    unknown = sorted(set(parameters) - set(names))
    if unknown:
        raise PaperFileError(f"{path}: reproduce.parameters names unknown profile(s) {unknown}; "
                             f"available: {', '.join(names)}")
    return PaperNotebook(paper=path.parent.name, title=require(data, "title", path), order=order,
                         notebook=NOTEBOOKS_DIR / get("notebook"),
                         tier=get("tier"), datasets=tuple(get("datasets") or ()), minutes=get("minutes"),
                         timeout_minutes=get("timeout_minutes"),
                         parameters={name: values or {} for name, values in parameters.items()})


def select(papers: list[PaperNotebook], names: list[str] | None) -> list[PaperNotebook]:
    """The papers called ``names`` in the order given, each once (all papers when none are given)."""
    if not names:
        return papers
    known = {p.paper: p for p in papers}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RunnerError(f"unknown paper(s) {unknown}; known papers: {', '.join(known)}")
    return [known[name] for name in dict.fromkeys(names)]  # a paper named twice would run twice into one folder


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and default values in a notebook's ``parameters`` cell (via papermill's own inspection)."""
    import papermill

    if not path.exists():
        raise RunnerError(f"notebook {path} not found")
    params = papermill.inspect_notebook(str(path))
    if not params and not _has_parameters_cell(path):
        raise RunnerError(f"notebook {path} has no cell tagged 'parameters'")
    return {name: info["default"] for name, info in params.items()}


def _has_parameters_cell(path: Path) -> bool:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells)


def check_parameters(entry: PaperNotebook, parameters: dict[str, Any]) -> None:
    """Refuse a parameter the notebook does not declare (papermill would only warn and ignore it)."""
    declared = notebook_parameters(entry.notebook)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise RunnerError(f"{entry.notebook.name}: unknown parameter(s) {unknown}; "
                          f"its parameters cell declares {sorted(declared)}")


def profile_config(paper: str, profile: str, config_type: type[C], **override: Any) -> C:
    """The ``config_type`` (the paper's notebook Config) that ``mdbench reproduce --paper <paper> --profile
    <profile>`` gives the notebook: the profile's shared parameters, then the paper's own at that profile, then
    ``override``, its session parameters left out. A profile that runs the notebook's own defaults (smoke) sets
    none of them, so this gives the Config's defaults there."""
    from mdbench.notebook import SESSION_PARAMS  # torch: only once a config is built

    entry = {e.paper: e for e in load_papers()}[paper]
    params = {**entry.parameters_for(load_profile(profile)), **override}
    return config_type.from_params({k: v for k, v in params.items() if k not in SESSION_PARAMS})


def run_parameters(entry: PaperNotebook, profile: Profile, data_dir: Path | None) -> dict[str, Any]:
    """What papermill injects: the profile's parameters, and ``data_dir`` where the notebook declares one."""
    parameters = entry.parameters_for(profile)
    if data_dir is not None and "data_dir" in notebook_parameters(entry.notebook):
        parameters["data_dir"] = str(data_dir)
    return parameters


def resolve_data_dir(data_dir: Path | str | None) -> Path | None:
    """The data root as an absolute path (notebooks run in ``notebooks/``): ``data_dir`` (``--data-dir``), which must
    exist, else ``MDBENCH_DATA_DIR``, else None."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise RunnerError(f"--data-dir {path} does not exist or is not a folder")
        return path.absolute()
    env_dir = os.environ.get("MDBENCH_DATA_DIR")
    return Path(env_dir).expanduser().absolute() if env_dir else None


def resolve_results_dir(results_dir: Path | str | None) -> Path:
    """The results folder as an absolute path (notebooks run in ``notebooks/``): ``results_dir``
    (``--results-dir``), else :func:`mdbench.results.results_root`."""
    from mdbench.results import results_root  # torch: only once a command needs the results

    return Path(results_dir or results_root()).absolute()


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    """How one notebook of a run went."""

    paper: str
    notebook: str
    status: str  # ok | failed | skipped | interrupted | not run
    minutes: float = 0.0
    detail: str = ""
    output: Path | None = None
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def missing_needs(entry: PaperNotebook, profile: Profile, data_dir: Path | None) -> str | None:
    """Why this machine cannot run the notebook at this profile, and the fix; None if it can."""
    if profile.requires_gpu:
        import torch

        if not torch.cuda.is_available():
            return f"profile {profile.name!r} needs a CUDA GPU and torch sees none: use --profile cpu or smoke"
    if profile.real_data and entry.datasets:
        if data_dir is None:
            return (f"profile {profile.name!r} needs real data: pass --data-dir DIR (or set MDBENCH_DATA_DIR) to the "
                    "folder that holds the datasets, or use --profile smoke (synthetic data)")
        if not data_dir.is_dir():
            return f"data folder {data_dir} (from MDBENCH_DATA_DIR) does not exist: pass --data-dir DIR"
        from mdbench.data.registry import get_spec

        missing = [d for d in entry.datasets if not (data_dir / get_spec(d).folder).is_dir()]
        if missing:
            return f"datasets {missing} not found under {data_dir} (data_cards/<name>.md says how to get them)"
    return None


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write and sync a byte in it, so that a full disk is found before anything runs."""
    probe = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}probe-")
        try:
            os.write(fd, b"\n")
            os.fsync(fd)  # a full disk may only say so here
        finally:
            os.close(fd)
    except OSError as err:
        raise RunnerError(f"results folder {folder} cannot be written: {err.strerror or err}") from err
    finally:
        if probe:
            Path(probe).unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s run lock; refuse at once, naming the holder's pid, when another process holds it."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunnerError(f"cannot create the lock file {path}: {err.strerror or err}") from err
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                raise RunnerError(f"results folder {folder} is in use by another mdbench reproduce (pid {holder}); "
                                  "wait for it to end or stop it, or pass another --results-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_temp_files(folder: Path) -> None:
    """Delete the temporary files under ``folder`` (its lock excepted): the caller holds the lock, so they belong to
    no live writer; a half-written ``.tmp-*.json`` in ``records/`` would otherwise be read as a corrupt record."""
    for path in folder.rglob(".tmp-*"):
        if path.name != LOCK_NAME and path.is_file():
            path.unlink(missing_ok=True)


def first_error(path: Path) -> str:
    """'In [N]: ExcName: message' of the first error in an executed notebook (N as Jupyter shows it)."""
    nb = _read_notebook(path)
    for cell in nb.cells if nb else []:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                message = str(out.get("evalue", "")).strip().splitlines()
                return f"In [{cell.get('execution_count')}]: {out.get('ename')}: {message[0] if message else ''}"
    return ""


def _read_notebook(path: Path):
    """The notebook at ``path``, or None when it is missing or not a whole notebook (papermill cut off)."""
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - truncated JSON, a missing file, an invalid notebook: all mean "none"
        return None


def _write_notebook(path: Path, nb) -> None:
    """Write ``nb`` to ``path`` as nbformat writes it, with the final newline of the committed notebooks."""
    import nbformat

    path.write_text(nbformat.writes(nb) + "\n")


def without_widgets(nb):
    """``nb`` (changed in place) without Jupyter widget state: ``metadata.widgets`` and every output that displays a
    widget (tqdm.auto's progress bars in a kernel), which a static render shows as a bar stalled at 0%."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if "outputs" in cell:
            cell.outputs = [out for out in cell.outputs if WIDGET_VIEW not in out.get("data", {})]
    return nb


_ERRNO_LINE = re.compile(r"\b\w*Error: \[Errno \d+\] .+")


def stderr_reason(text: str) -> str:
    """Why a papermill process died, from its log: the last ``...Error: [Errno N] ...`` line if there is one (a
    full disk cuts the traceback short, so its last line is often a fragment), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errno_lines = [m.group(0) for line in lines if (m := _ERRNO_LINE.search(line))]
    return errno_lines[-1] if errno_lines else (lines[-1] if lines else "")


def papermill_command(notebook: Path, output: Path, params_file: Path) -> list[str]:
    """The papermill command line that executes ``notebook`` into ``output`` (tests substitute a fake)."""
    return [sys.executable, "-m", "papermill", str(notebook), str(output), "-f", str(params_file), "-k", KERNEL,
            "--cwd", str(notebook.parent), "--log-output", "--no-progress-bar"]


def _temp_file(folder: Path, stem: str, suffix: str) -> Path:
    """A new empty file ``.tmp-run-<stem>-<random><suffix>`` in ``folder``, readable by all like the results."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{stem}-", suffix=suffix, dir=folder)
        os.close(fd)
        os.chmod(name, 0o644)  # mkstemp makes it private; the executed notebook is kept
    except OSError as err:
        raise RunnerError(f"cannot create a file in {folder}: {err.strerror or err}") from err
    return Path(name)


class NotebookRun:
    """One notebook being executed by papermill under a guard; :meth:`start` it, then :meth:`poll` until done."""

    def __init__(self, entry: PaperNotebook, profile: Profile, results_dir: Path, data_dir: Path | None):
        self.entry, self.profile, self.results_dir, self.data_dir = entry, profile, results_dir, data_dir
        self.out_dir = results_dir / entry.paper / profile.name
        self.stem = entry.notebook.stem
        self.log = self.out_dir / f"{self.stem}.log"
        self.progress = NotebookProgress(entry.notebook, self.log, float(entry.minutes.get(profile.name, 0)))
        self.proc: subprocess.Popen | None = None
        self.temp_files: list[Path] = []
        self.start_time = time.monotonic()

    def start(self) -> None:
        """Write the parameters and start papermill under its guard, in a session of its own (so the terminal's
        Ctrl-C reaches only mdbench, which then stops the notebook itself), writing its live log."""
        parameters = run_parameters(self.entry, self.profile, self.data_dir)  # checked by reproduce
        self.tmp_out = _temp_file(self.out_dir, self.stem, ".ipynb")
        self.temp_files.append(self.tmp_out)
        params_file = _temp_file(self.out_dir, self.stem, "-params.yaml")
        self.temp_files.append(params_file)
        try:
            params_file.write_text(yaml.safe_dump(parameters))
        except OSError as err:
            raise RunnerError(f"cannot write {params_file}: {err.strerror or err}") from err
        env = {**os.environ, "MDBENCH_RESULTS_DIR": str(self.results_dir), "PYTHONUNBUFFERED": "1"}
        if self.data_dir is not None:
            env["MDBENCH_DATA_DIR"] = str(self.data_dir)
        cmd = guard_command(papermill_command(self.entry.notebook, self.tmp_out, params_file))
        try:
            with self.log.open("w") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        except OSError as err:
            raise RunnerError(f"cannot start papermill for {self.entry.notebook.name}: {err}") from err
        self.start_time = time.monotonic()

    @property
    def started(self) -> subprocess.Popen:
        """The guard process that :meth:`start` started."""
        if self.proc is None:
            raise RuntimeError(f"{self.stem} has not been started")
        return self.proc

    @property
    def minutes(self) -> float:
        return (time.monotonic() - self.start_time) / 60

    def status(self) -> Status:
        """Which section and cell the notebook is in, and for how long it has run."""
        return self.progress.status(time.monotonic() - self.start_time)

    def poll(self) -> RunResult | None:
        """The result once papermill has ended (or was stopped past the timeout); None while it runs."""
        returncode = self.started.poll()
        if returncode is not None:
            return self.finish(returncode)
        timeout_s = self.entry.timeout_s(self.profile.name)
        if time.monotonic() - self.start_time > timeout_s:
            self.stop()
            self.wait_stopped()
            return self.finish(self.started.returncode, f"timed out after {timeout_s / 60:g} min")
        return None

    def stop(self) -> None:
        """Ask the guard to kill the notebook's process tree (returns at once; see :meth:`wait_stopped`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait_stopped(self) -> None:
        """Wait for the guard to end; kill its tree from here if it does not in time."""
        proc = self.started
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            kill_descendants(proc.pid, grace_s=0)
            proc.kill()
            proc.wait()

    def finish(self, returncode: int, detail: str = "") -> RunResult:
        """Move the outputs to their final names and say how the notebook went; no temporary file is left."""
        try:
            return self._finish(returncode, detail)
        except OSError as err:
            return self.result("failed", f"{err.strerror or err}: {err.filename}")
        finally:
            self._remove_temp_files()

    def _finish(self, returncode: int, detail: str) -> RunResult:
        executed = self.out_dir / f"{self.stem}.executed.ipynb"
        failed = self.out_dir / f"{self.stem}.failed.ipynb"
        written = _read_notebook(self.tmp_out)
        if written is not None:
            _write_notebook(self.tmp_out, without_widgets(written))
        if returncode == 0 and not detail:
            os.replace(self.tmp_out, executed)
            failed.unlink(missing_ok=True)  # it was older than this good run
            return self.result("ok", output=executed)
        if written is not None:
            os.replace(self.tmp_out, failed)
            detail = detail or first_error(failed)
        else:  # cut off (a full disk): keep only the log, and no failed notebook from an older run beside it
            failed.unlink(missing_ok=True)
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        reason = stderr_reason(text)
        if not detail and not _ERRNO_LINE.search(reason):
            try:  # a disk so full that papermill could not even write its traceback
                ensure_writable(self.out_dir)
            except RunnerError as err:
                detail = str(err)
        detail = detail or reason or f"papermill exited with code {returncode}"
        return self.result("failed", detail, output=failed if failed.exists() else self.log)

    def discard(self, status: str, detail: str) -> RunResult:
        """The result of a notebook that did not start or was stopped by a signal: its temporary files are removed
        and nothing it left replaces an earlier run's outputs."""
        self._remove_temp_files()
        return self.result(status, detail)

    def _remove_temp_files(self) -> None:
        for path in self.temp_files:
            path.unlink(missing_ok=True)

    def result(self, status: str, detail: str = "", output: Path | None = None) -> RunResult:
        log = self.log if self.proc is not None else None  # a notebook that never started has none
        return RunResult(self.entry.paper, self.entry.notebook.name, status, self.minutes, detail, output, log)


@contextmanager
def _signals_to_stop() -> Iterator[list[int]]:
    """While the notebooks run, SIGINT and SIGTERM only append to the yielded list, so the main loop can stop the
    notebooks and clean up instead of dying at a random point (off the main thread, signals cannot be caught)."""
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_all(todo: list[PaperNotebook], profile: Profile, results_dir: Path, data_dir: Path | None, jobs: int,
             progress: bool) -> list[RunResult]:
    """Run the notebooks, at most ``jobs`` at once, from the main thread so that signals are handled at once; show
    their progress live unless ``progress`` is False (then one line per notebook as it ends)."""
    pending = deque(todo)
    running: list[NotebookRun] = []
    done: list[RunResult] = []
    display = Display(live=progress)
    with _signals_to_stop() as stop:
        def report(result: RunResult) -> None:
            done.append(result)
            display.finished(result.notebook, result_line(result))

        try:
            while (pending or running) and not stop:
                while pending and len(running) < jobs:
                    run = NotebookRun(pending.popleft(), profile, results_dir, data_dir)
                    try:
                        run.start()
                        running.append(run)
                        display.started(run.progress)
                    except RunnerError as err:  # the disk filled up since the checks: this notebook fails
                        report(run.discard("failed", str(err)))
                for run in list(running):
                    result = run.poll()
                    if result is None:
                        display.update(run.status())
                    else:
                        running.remove(run)
                        report(result)
                time.sleep(POLL_S)
        finally:  # stopped by a signal, or an error in this loop: nothing may outlive it
            display.close()
            for run in running:
                run.stop()
            for run in running:
                run.wait_stopped()
        if stop:
            done += [run.discard("interrupted", f"stopped by {signal.Signals(stop[0]).name}") for run in running]
            done += [RunResult(e.paper, e.notebook.name, "not run", detail="interrupted before it started")
                     for e in pending]
            raise Interrupted(stop[0], done)
    return done


def result_line(result: RunResult) -> str:
    """One line on how a notebook went: status, paper, minutes, the first error, and where its log is."""
    line = f"{result.status:<6} {result.paper:<12} {result.minutes:5.1f} min  {result.detail}".rstrip()
    return f"{line}  (log: {result.log})" if result.status == "failed" and result.log else line


def reproduce(papers: list[str] | None = None, profile_name: str = "cpu", jobs: int = 1,
              results_dir: Path | None = None, data_dir: Path | None = None, progress: bool = True,
              papers_dir: Path = PAPERS_DIR, log=print, resume: bool = False,
              run_all: Callable[..., list[RunResult]] | None = None) -> list[RunResult]:
    """Run the selected notebooks at a profile; returns one result per notebook (ok, failed or skipped).

    ``data_dir`` (``--data-dir``) wins over ``MDBENCH_DATA_DIR``; the notebooks get it as their ``data_dir`` parameter
    and in their environment. Raises :class:`RunnerError` for bad input, a results folder held by another run, or
    when every notebook would be skipped; :class:`~mdbench.paper_yaml.PaperFileError` for a paper.yaml that lacks a
    key; :class:`Interrupted` when SIGINT or SIGTERM stopped the run. ``papers_dir`` holds the papers (tests point
    it at toy ones). ``resume`` passes ``resume=True`` to every notebook (its stored units of work are loaded).
    ``run_all`` runs the notebooks once the checks pass and their folders are locked, with :func:`_run_all`'s
    arguments (default: that function, papermill processes on this machine; :mod:`mdbench.dask_executor` passes its
    own).
    """
    if jobs < 1:
        raise RunnerError(f"--jobs must be at least 1, got {jobs}")
    profile = load_profile(profile_name)
    if resume:  # a shared parameter, so that every notebook gets it (and one that does not declare it is refused)
        profile = replace(profile, parameters={**profile.parameters, "resume": True})
    entries = select(load_papers(papers_dir), papers)
    data_dir = resolve_data_dir(data_dir)
    results_dir = resolve_results_dir(results_dir)
    ensure_writable(results_dir)
    for entry in entries:  # refuse bad parameters before spending minutes on the first notebook
        check_parameters(entry, run_parameters(entry, profile, data_dir))

    todo, results = [], []
    for entry in entries:
        reason = missing_needs(entry, profile, data_dir)
        if reason:
            results.append(RunResult(entry.paper, entry.notebook.name, "skipped", detail=reason))
        else:
            todo.append(entry)
    if not todo:
        raise RunnerError(f"nothing to run at profile {profile.name}: "
                          + "; ".join(dict.fromkeys(r.detail for r in results)))
    for skipped in results:
        log(f"skip  {skipped.paper:<12} {skipped.detail}")

    order = {e.paper: i for i, e in enumerate(entries)}
    with ExitStack() as stack:
        for entry in todo:
            folder = results_dir / entry.paper / profile.name
            ensure_writable(folder)
            stack.enter_context(folder_lock(folder))
            remove_temp_files(folder)  # what a killed run left
            stack.callback(remove_temp_files, folder)  # what this run's stopped notebooks left, before unlocking
        expected = sum(float(e.minutes.get(profile.name, 0)) for e in todo)
        log(f"profile {profile.name}: {len(todo)} notebook(s) to run, about {expected:.0f} min expected, jobs={jobs}")
        try:
            results.extend((run_all or _run_all)(todo, profile, results_dir, data_dir, jobs, progress))
        except Interrupted as stopped:
            stopped.results = sorted(results + stopped.results, key=lambda r: order[r.paper])
            raise
    from mdbench.verdicts import write_summary  # SciPy and pandas: only once the notebooks have run

    write_summary(results_dir)  # every paper's claim checks in one file, this run's included
    return sorted(results, key=lambda r: order[r.paper])


def summary_table(results: list[RunResult]) -> str:
    """The run's results as a text table: notebook, status, minutes, first error or reason."""
    lines = [f"{'notebook':<28} {'status':<11} {'minutes':>7}  first error / reason", "-" * 81]
    for r in results:
        minutes = f"{r.minutes:7.1f}" if r.status not in ("skipped", "not run") else f"{'-':>7}"
        lines.append(f"{r.notebook:<28} {r.status:<11} {minutes}  {r.detail}")
    return "\n".join(lines)


def outputs_text(results: list[RunResult], results_dir: Path) -> str:
    """Where the run left its outputs: each notebook's executed (or failed) notebook and its log, and the files that
    hold every claim check and their tally."""
    lines = ["outputs:"]
    for r in results:
        shown = r.output or r.log  # a stopped notebook left only its log
        if shown is not None:
            log = f"  (log: {r.log})" if r.log not in (None, shown) else ""
            lines.append(f"  {r.paper:<12} {shown}{log}")
    lines.append(f"  {'claims':<12} {results_dir / 'summary.csv'} (tally: {results_dir / 'summary.md'})")
    return "\n".join(lines)


def tally_text(results_dir: Path, profile: str, papers: list[str]) -> str:
    """How many of the claims of ``papers`` at ``profile`` hold, do not hold, are inconclusive or were not run, as
    judged on the records under ``results_dir``."""
    from mdbench.verdicts import summary, tally  # pandas and SciPy: only once the notebooks have run

    claims = summary(results_dir)
    claims = claims[(claims["profile"] == profile) & claims["paper"].isin(papers)]
    if claims.empty:
        return f"claims at profile {profile}: none judged"
    return f"claims at profile {profile}:\n" + tally(claims).drop(columns="profile").to_string(index=False)


def execute_in_place(paths: Sequence[Path], timeout_s: float = 600, progress: bool = False) -> None:
    """Re-run notebooks with their own (smoke) defaults and store the outputs in them, without widget state, as
    committed for nbval. Each is written back only once all have run (those done before a failure, then the error):
    a notebook written back earlier would make the tree dirty for the next one's banner."""
    import nbformat
    from nbclient import NotebookClient

    from mdbench.io import atomic_write

    executed = []
    try:
        for path in paths:
            notebook_parameters(path)  # refuses a notebook without a parameters cell
            nb = nbformat.read(path, as_version=4)
            if nb.metadata.get("kernelspec", {}).get("name") != KERNEL:
                raise RunnerError(f"{path}: kernelspec must be {KERNEL!r}")
            if progress:
                print(f"executing {path} ...", flush=True)
            NotebookClient(nb, kernel_name=KERNEL, timeout=timeout_s,
                           resources={"metadata": {"path": str(path.parent)}}).execute()
            executed.append((path, nb))
    finally:
        for path, nb in executed:
            atomic_write(path, nbformat.writes(without_widgets(nb)) + "\n")

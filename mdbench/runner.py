"""Execute the paper notebooks with papermill at a profile: the engine behind ``mdbench reproduce``.

Each notebook runs in its own papermill process (so a timeout can stop it and ``--jobs`` can run several), with the
profile's parameters injected into the cell tagged ``parameters``. The executed notebook and its stderr are kept in
``results/<paper>/<profile>/``; a notebook that fails is kept as ``<name>.failed.ipynb`` and never replaces the last
good ``<name>.executed.ipynb``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import yaml

from mdbench.results import atomic_write_text, results_root

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
KERNEL = "python3"


class RunnerError(ValueError):
    """Bad input to the runner: unknown paper or profile, malformed manifest, unknown parameter."""


# --------------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    requires_gpu: bool
    real_data: bool
    deterministic: bool
    parameters: dict[str, Any]
    notebooks: dict[str, dict[str, Any]]

    def parameters_for(self, paper: str) -> dict[str, Any]:
        """The profile's parameters for one notebook: the shared ones, then the notebook's own."""
        return {**self.parameters, **(self.notebooks.get(paper) or {})}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        raise RunnerError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return Profile(name=data["name"], description=data.get("description", ""),
                       requires_gpu=bool(data.get("requires_gpu", False)),
                       real_data=bool(data.get("real_data", False)),
                       deterministic=bool(data.get("deterministic", True)),
                       parameters=data.get("parameters") or {}, notebooks=data.get("notebooks") or {})
    except KeyError as err:
        raise RunnerError(f"profile file {path} lacks the key {err}") from err


# --------------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class NotebookEntry:
    paper: str
    notebook: Path
    tier: str
    datasets: tuple[str, ...]
    minutes: dict[str, float]
    timeout_minutes: dict[str, float]

    def timeout_s(self, profile: str) -> float:
        return 60.0 * float(self.timeout_minutes.get(profile, 30))


def load_manifest(path: Path = NOTEBOOKS_DIR / "manifest.yaml") -> list[NotebookEntry]:
    if not path.exists():
        raise RunnerError(f"notebook manifest {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    entries = []
    for item in data.get("notebooks") or []:
        try:
            entries.append(NotebookEntry(paper=item["paper"], notebook=path.parent / item["notebook"],
                                         tier=item.get("tier", "paper"), datasets=tuple(item.get("datasets") or ()),
                                         minutes=item.get("minutes") or {},
                                         timeout_minutes=item.get("timeout_minutes") or {}))
        except KeyError as err:
            raise RunnerError(f"manifest {path}: an entry lacks {err}: {item}") from err
    return entries


def select(entries: list[NotebookEntry], papers: list[str] | None) -> list[NotebookEntry]:
    if not papers:
        return entries
    known = {e.paper: e for e in entries}
    unknown = [p for p in papers if p not in known]
    if unknown:
        raise RunnerError(f"unknown paper(s) {unknown}; the manifest lists: {', '.join(known)}")
    return [known[p] for p in papers]


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
    nb = nbformat.read(path, as_version=4)
    return any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells)


def check_parameters(entry: NotebookEntry, parameters: dict[str, Any]) -> None:
    """Refuse a parameter the notebook does not declare (papermill would only warn and ignore it)."""
    declared = notebook_parameters(entry.notebook)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise RunnerError(f"{entry.notebook.name}: unknown parameter(s) {unknown}; "
                          f"its parameters cell declares {sorted(declared)}")


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    paper: str
    notebook: str
    status: str  # ok | failed | skipped
    minutes: float = 0.0
    detail: str = ""
    output: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def missing_needs(entry: NotebookEntry, profile: Profile, data_dir: Path | None) -> str | None:
    """Why this machine cannot run the notebook at this profile, or None if it can."""
    if profile.requires_gpu:
        import torch

        if not torch.cuda.is_available():
            return f"profile {profile.name!r} needs a CUDA GPU and none is visible"
    if profile.real_data and entry.datasets:
        if data_dir is None:
            return f"profile {profile.name!r} needs real data: set MDBENCH_DATA_DIR"
        from mdbench.data.registry import get_spec

        missing = [d for d in entry.datasets if not (data_dir / get_spec(d).folder).is_dir()]
        if missing:
            return f"datasets {missing} not found under {data_dir}"
    return None


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-probe-"):
            pass
    except OSError as err:
        raise RunnerError(f"results folder {folder} cannot be written: {err}") from err


def first_error(path: Path) -> str:
    """'In [N]: ExcName: message' of the first error in an executed notebook (N as Jupyter shows it)."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - a notebook papermill could not even write is reported by the caller
        return ""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                message = str(out.get("evalue", "")).strip().splitlines()
                return f"In [{cell.get('execution_count')}]: {out.get('ename')}: {message[0] if message else ''}"
    return ""


def run_notebook(entry: NotebookEntry, profile: Profile, results_dir: Path, progress: bool = False) -> RunResult:
    """Execute one notebook through papermill in a subprocess, with the manifest's timeout."""
    out_dir = results_dir / entry.paper / profile.name
    ensure_writable(out_dir)
    parameters = profile.parameters_for(entry.paper)
    check_parameters(entry, parameters)
    stem = entry.notebook.stem
    params_file = out_dir / f".tmp-{stem}-params.yaml"
    tmp_out = out_dir / f".tmp-{stem}.ipynb"
    stderr_path = out_dir / f"{stem}.stderr.txt"
    atomic_write_text(params_file, yaml.safe_dump(parameters))
    cmd = [sys.executable, "-m", "papermill", str(entry.notebook), str(tmp_out), "-f", str(params_file),
           "-k", KERNEL, "--cwd", str(entry.notebook.parent), "--no-progress-bar" if not progress else "--progress-bar"]
    env = {**os.environ, "MDBENCH_RESULTS_DIR": str(results_dir), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    try:
        with stderr_path.open("w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                  timeout=entry.timeout_s(profile.name))
        returncode, detail = proc.returncode, ""
    except subprocess.TimeoutExpired:
        returncode, detail = -1, f"timed out after {entry.timeout_s(profile.name) / 60:.0f} min"
    finally:
        params_file.unlink(missing_ok=True)
    minutes = (time.monotonic() - start) / 60
    if returncode == 0:
        final = out_dir / f"{stem}.executed.ipynb"
        os.replace(tmp_out, final)
        return RunResult(entry.paper, entry.notebook.name, "ok", minutes, output=final)
    final = out_dir / f"{stem}.failed.ipynb"
    if tmp_out.exists():
        os.replace(tmp_out, final)
        detail = detail or first_error(final)
    if not detail:
        lines = [ln for ln in stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"papermill exited with code {returncode}"
    return RunResult(entry.paper, entry.notebook.name, "failed", minutes, detail=detail,
                     output=final if final.exists() else stderr_path)


def reproduce(papers: list[str] | None = None, profile_name: str = "cpu", jobs: int = 1,
              results_dir: Path | None = None, data_dir: Path | None = None, progress: bool = True,
              manifest: Path | None = None, log=print) -> list[RunResult]:
    """Run the selected notebooks at a profile; returns one result per notebook (ok, failed or skipped)."""
    if jobs < 1:
        raise RunnerError(f"--jobs must be at least 1, got {jobs}")
    profile = load_profile(profile_name)
    entries = select(load_manifest(manifest or NOTEBOOKS_DIR / "manifest.yaml"), papers)
    results_dir = Path(results_dir or results_root())
    ensure_writable(results_dir)
    env_dir = os.environ.get("MDBENCH_DATA_DIR")
    data_dir = Path(data_dir) if data_dir else (Path(env_dir) if env_dir else None)
    for entry in entries:  # refuse bad parameters before spending minutes on the first notebook
        check_parameters(entry, profile.parameters_for(entry.paper))

    todo, results = [], []
    for entry in entries:
        reason = missing_needs(entry, profile, data_dir)
        if reason:
            results.append(RunResult(entry.paper, entry.notebook.name, "skipped", detail=reason))
            log(f"skip  {entry.paper:<12} {reason}")
        else:
            todo.append(entry)
    expected = sum(float(e.minutes.get(profile.name, 0)) for e in todo)
    log(f"profile {profile.name}: {len(todo)} notebook(s) to run, about {expected:.0f} min expected, jobs={jobs}")

    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc=f"reproduce ({profile.name})", unit="nb", disable=not progress) as bar:
        def _run(entry: NotebookEntry) -> RunResult:
            result = run_notebook(entry, profile, results_dir)
            bar.update(1)
            bar.write(f"{result.status:<6} {entry.paper:<12} {result.minutes:5.1f} min  {result.detail}")
            return result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results.extend(pool.map(_run, todo))
    order = {e.paper: i for i, e in enumerate(entries)}
    return sorted(results, key=lambda r: order[r.paper])


def summary_table(results: list[RunResult]) -> str:
    lines = [f"{'notebook':<28} {'status':<8} {'minutes':>7}  first error / reason", "-" * 78]
    for r in results:
        minutes = f"{r.minutes:7.1f}" if r.status != "skipped" else f"{'-':>7}"
        lines.append(f"{r.notebook:<28} {r.status:<8} {minutes}  {r.detail}")
    return "\n".join(lines)


def execute_in_place(path: Path, timeout_s: float = 600) -> None:
    """Re-run a notebook with its own (smoke) defaults and store the outputs in it, as committed for nbval."""
    from nbclient import NotebookClient

    notebook_parameters(path)  # refuses a notebook without a parameters cell
    nb = nbformat.read(path, as_version=4)
    if nb.metadata.get("kernelspec", {}).get("name") != KERNEL:
        raise RunnerError(f"{path}: kernelspec must be {KERNEL!r}")
    NotebookClient(nb, kernel_name=KERNEL, timeout=timeout_s,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    atomic_write_text(path, nbformat.writes(nb) + "\n")

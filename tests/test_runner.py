"""The papermill runner behind `mdbench reproduce`, the profiles, and the notebooks' own conventions."""
from __future__ import annotations

import nbformat
import pytest
import torch
import yaml

from mdbench import cli, runner

NOTEBOOKS = sorted(runner.NOTEBOOKS_DIR.glob("*.ipynb"))


def _notebook(path, body: str, params: str = "profile = 'smoke'\ndevice = 'cpu'"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


def _manifest(tmp_path, notebook, paper="toy", datasets=()):
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"notebooks": [
        {"paper": paper, "notebook": notebook.name, "datasets": list(datasets),
         "minutes": {"smoke": 1}, "timeout_minutes": {"smoke": 2}}]}))
    return path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_have_parameters_cell_and_python3_kernel(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"


def test_every_manifest_notebook_exists_and_smoke_profile_equals_its_defaults():
    """The committed outputs are the smoke run, so the smoke profile must not change any default."""
    smoke = runner.load_profile("smoke")
    for entry in runner.load_manifest():
        defaults = runner.notebook_parameters(entry.notebook)
        for name, value in smoke.parameters_for(entry.paper).items():
            assert name in defaults, f"{entry.notebook.name} lacks parameter {name}"
            assert yaml.safe_load(defaults[name]) == value, f"{entry.notebook.name}: {name}"


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_profiles_only_set_declared_parameters(name):
    profile = runner.load_profile(name)
    for entry in runner.load_manifest():
        runner.check_parameters(entry, profile.parameters_for(entry.paper))


def test_bad_names_are_refused(capsys):
    with pytest.raises(runner.RunnerError, match="unknown profile 'huge'"):
        runner.load_profile("huge")
    with pytest.raises(runner.RunnerError, match="unknown paper"):
        runner.select(runner.load_manifest(), ["nonexistent"])
    assert cli.main(["reproduce", "--paper", "nonexistent", "--profile", "smoke"]) == 2
    assert "unknown paper" in capsys.readouterr().err


def test_unknown_parameter_and_missing_parameters_cell(tmp_path):
    good = _notebook(tmp_path / "good.ipynb", "x = 1")
    entry = runner.load_manifest(_manifest(tmp_path, good))[0]
    with pytest.raises(runner.RunnerError, match=r"unknown parameter\(s\) \['epochs'\]"):
        runner.check_parameters(entry, {"epochs": 3})
    bare = tmp_path / "bare.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, bare)
    with pytest.raises(runner.RunnerError, match="no cell tagged 'parameters'"):
        runner.notebook_parameters(bare)
    with pytest.raises(runner.RunnerError, match="not found"):
        runner.notebook_parameters(tmp_path / "missing.ipynb")


def test_failing_notebook_is_reported_and_keeps_the_last_good_run(tmp_path):
    results = tmp_path / "results"
    good_run = results / "toy" / "smoke" / "bad.executed.ipynb"
    good_run.parent.mkdir(parents=True)
    good_run.write_text("last good run")
    notebook = _notebook(tmp_path / "bad.ipynb", "raise ValueError('the data folder is empty')")
    [result] = runner.reproduce(profile_name="smoke", results_dir=results, manifest=_manifest(tmp_path, notebook),
                                progress=False, log=lambda *_: None)
    assert result.status == "failed"
    # parameters cell, papermill's injected parameters, then the failing cell
    assert result.detail == "In [3]: ValueError: the data folder is empty"
    assert good_run.read_text() == "last good run"
    assert (results / "toy" / "smoke" / "bad.failed.ipynb").exists()
    assert (results / "toy" / "smoke" / "bad.stderr.txt").exists()
    assert "failed" in runner.summary_table([result])


def test_good_notebook_gets_profile_parameters(tmp_path):
    results = tmp_path / "results"
    notebook = _notebook(tmp_path / "ok.ipynb", "assert profile == 'smoke'\nprint('ran on', device)")
    [result] = runner.reproduce(profile_name="smoke", results_dir=results, manifest=_manifest(tmp_path, notebook),
                                progress=False, log=lambda *_: None)
    assert result.status == "ok", result.detail
    executed = nbformat.read(result.output, as_version=4)
    assert "ran on cpu" in executed.cells[-1].outputs[0]["text"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_profile_is_skipped_without_a_gpu(tmp_path):
    notebook = _notebook(tmp_path / "ok.ipynb", "pass", params="profile = 'gpu'\ndevice = 'cuda'")
    skipped = []
    with pytest.raises(runner.RunnerError, match=r"nothing to run: profile 'gpu' needs a CUDA GPU .*--profile cpu"):
        runner.reproduce(profile_name="gpu", results_dir=tmp_path / "r", manifest=_manifest(tmp_path, notebook),
                         progress=False, log=skipped.append)
    assert skipped and skipped[0].startswith("skip  toy")


def test_real_data_profile_is_skipped_without_its_datasets(tmp_path):
    notebook = _notebook(tmp_path / "ok.ipynb", "pass", params="profile = 'cpu'\ndevice = 'cpu'")
    with pytest.raises(runner.RunnerError, match=r"nothing to run: datasets \['pbc'\] not found under"):
        runner.reproduce(profile_name="cpu", results_dir=tmp_path / "r", data_dir=tmp_path,
                         manifest=_manifest(tmp_path, notebook, datasets=["pbc"]), progress=False,
                         log=lambda *_: None)


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(runner.RunnerError, match="cannot be written"):
        runner.ensure_writable(blocker / "results")


def test_jobs_must_be_positive():
    with pytest.raises(runner.RunnerError, match="--jobs"):
        runner.reproduce(profile_name="smoke", jobs=0)

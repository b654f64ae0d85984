"""The papermill runner behind `mdbench reproduce`, the profiles, and the notebooks' own conventions."""
from __future__ import annotations

import re

import nbformat
import pytest
import torch
import yaml

from mdbench import cli, runner
from mdbench.paper_yaml import PaperFileError, paper_file

from toy_papers import write_notebook, write_paper

NOTEBOOKS = sorted(runner.NOTEBOOKS_DIR.glob("*.ipynb"))
PAPERS = runner.load_papers()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_have_parameters_cell_and_python3_kernel(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"


def test_papers_run_quickstart_first_then_by_their_order():
    assert [p.paper for p in PAPERS] == ["quickstart", "med_tuning", "efcm", "rd", "daft"]
    assert all(p.notebook.is_file() for p in PAPERS)


@pytest.mark.parametrize("paper", PAPERS, ids=lambda p: p.paper)
def test_smoke_runs_each_notebook_at_its_own_defaults(paper):
    """The committed outputs are the smoke run, so smoke injects nothing but the shared values, and those are the
    notebook's defaults already."""
    smoke = runner.load_profile("smoke")
    parameters = paper.parameters_for(smoke)
    assert parameters == smoke.parameters
    defaults = runner.notebook_parameters(paper.notebook)
    for name, value in parameters.items():
        assert name in defaults, f"{paper.notebook.name} lacks parameter {name}"
        assert yaml.safe_load(defaults[name]) == value, f"{paper.notebook.name}: {name}"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
@pytest.mark.parametrize("paper", PAPERS, ids=lambda p: p.paper)
def test_cpu_and_gpu_set_only_parameters_the_notebook_declares(paper, name):
    profile = runner.load_profile(name)
    assert paper.parameters[name], f"{paper.paper} has no {name} parameters of its own"
    runner.check_parameters(paper, paper.parameters_for(profile))


def test_a_paper_parameter_wins_over_the_shared_one(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", "pass")
    papers_dir = write_paper(tmp_path / "papers", notebook, parameters={"cpu": {"device": "cuda:1"}, "gpu": {}})
    [paper] = runner.load_papers(papers_dir)
    assert paper.parameters_for(runner.load_profile("cpu")) == {"profile": "cpu", "device": "cuda:1"}


def _refused(tmp_path, match, **reproduce):
    papers_dir = write_paper(tmp_path / "papers", tmp_path / "nb.ipynb", **reproduce)
    with pytest.raises(PaperFileError, match=match):
        runner.load_papers(papers_dir)


def test_a_paper_yaml_missing_a_key_names_the_file_and_the_key(tmp_path):
    path = re.escape(str(tmp_path / "papers" / "toy" / "paper.yaml"))
    _refused(tmp_path, f"{path} lacks the key reproduce.tier", tier=None)
    _refused(tmp_path, f"{path} lacks the key reproduce.parameters.gpu", parameters={"cpu": {}})
    _refused(tmp_path, f"{path} lacks the key reproduce.minutes.cpu", minutes={"smoke": 1})
    (tmp_path / "papers" / "toy" / "paper.yaml").write_text("paper: toy\n")
    with pytest.raises(PaperFileError, match=f"{path} lacks the key reproduce$"):
        runner.load_papers(tmp_path / "papers")


def test_a_paper_yaml_with_bad_values_is_refused(tmp_path):
    _refused(tmp_path, "reproduce.parameters.smoke must go: the smoke profile runs the notebook's own defaults",
             parameters={"smoke": {}, "cpu": {}, "gpu": {}})
    _refused(tmp_path, r"unknown profile\(s\) \['cpuu'\]; available: cpu, gpu, smoke",
             parameters={"cpu": {}, "cpuu": {}, "gpu": {}})
    _refused(tmp_path, "reproduce.order must be an integer, not 'first'", order="first")
    notebook = tmp_path / "nb.ipynb"
    write_paper(tmp_path / "papers", notebook, paper="other", order=1)
    _refused(tmp_path, r"papers other and toy \(in .*\) both have reproduce.order 1; give each paper its own")


def test_bad_names_are_refused(capsys):
    with pytest.raises(runner.RunnerError, match="unknown profile 'huge'; available: cpu, gpu, smoke"):
        runner.load_profile("huge")
    with pytest.raises(runner.RunnerError, match=r"unknown paper\(s\) \['nonexistent'\]; known papers: quickstart, "):
        runner.select(PAPERS, ["nonexistent"])
    assert cli.main(["reproduce", "--paper", "nonexistent", "--profile", "smoke"]) == 2
    assert "unknown paper" in capsys.readouterr().err


def test_unknown_parameter_and_missing_parameters_cell(tmp_path):
    good = write_notebook(tmp_path / "good.ipynb", "x = 1")
    [paper] = runner.load_papers(write_paper(tmp_path / "papers", good))
    with pytest.raises(runner.RunnerError, match=r"unknown parameter\(s\) \['epochs'\]"):
        runner.check_parameters(paper, {"epochs": 3})
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
    notebook = write_notebook(tmp_path / "bad.ipynb", "raise ValueError('the data folder is empty')")
    [result] = runner.reproduce(profile_name="smoke", results_dir=results,
                                papers_dir=write_paper(tmp_path / "papers", notebook), progress=False,
                                log=lambda *_: None)
    assert result.status == "failed"
    # parameters cell, papermill's injected parameters, then the failing cell
    assert result.detail == "In [3]: ValueError: the data folder is empty"
    assert good_run.read_text() == "last good run"
    assert (results / "toy" / "smoke" / "bad.failed.ipynb").exists()
    assert result.log == results / "toy" / "smoke" / "bad.log" and "the data folder is empty" in result.log.read_text()
    assert "failed" in runner.summary_table([result])


def test_good_notebook_gets_profile_parameters(tmp_path):
    results = tmp_path / "results"
    notebook = write_notebook(tmp_path / "ok.ipynb", "assert profile == 'smoke'\nprint('ran on', device)")
    [result] = runner.reproduce(profile_name="smoke", results_dir=results,
                                papers_dir=write_paper(tmp_path / "papers", notebook), progress=False,
                                log=lambda *_: None)
    assert result.status == "ok", result.detail
    executed = nbformat.read(result.output, as_version=4)
    assert "ran on cpu" in executed.cells[-1].outputs[0]["text"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_profile_is_skipped_without_a_gpu(tmp_path):
    notebook = write_notebook(tmp_path / "ok.ipynb", "pass", params="profile = 'gpu'\ndevice = 'cuda'")
    with pytest.raises(runner.RunnerError,
                       match=r"nothing to run at profile gpu: profile 'gpu' needs a CUDA GPU .*--profile cpu or smoke"):
        runner.reproduce(profile_name="gpu", results_dir=tmp_path / "r",
                         papers_dir=write_paper(tmp_path / "papers", notebook), progress=False, log=lambda *_: None)


def test_real_data_profile_is_skipped_without_its_datasets(tmp_path):
    notebook = write_notebook(tmp_path / "ok.ipynb", "pass", params="profile = 'cpu'\ndevice = 'cpu'")
    with pytest.raises(runner.RunnerError, match=r"nothing to run at profile cpu: datasets \['pbc'\] not found under"):
        runner.reproduce(profile_name="cpu", results_dir=tmp_path / "r", data_dir=tmp_path,
                         papers_dir=write_paper(tmp_path / "papers", notebook, datasets=["pbc"]), progress=False,
                         log=lambda *_: None)


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(runner.RunnerError, match="cannot be written"):
        runner.ensure_writable(blocker / "results")


def test_jobs_must_be_positive():
    with pytest.raises(runner.RunnerError, match="--jobs"):
        runner.reproduce(profile_name="smoke", jobs=0)


# ------------------------------------------------------------------------------- widgets, logs and live progress
def _widget_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    bar = nbformat.v4.new_output("display_data", data={runner.WIDGET_VIEW: {"model_id": "1"},
                                                       "text/plain": "  0%|          | 0/3"})
    text = nbformat.v4.new_output("stream", name="stdout", text="kept\n")
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[bar, text]), nbformat.v4.new_markdown_cell("# kept")]
    return nb


def test_without_widgets_drops_widget_state_and_views_only():
    nb = runner.without_widgets(_widget_notebook())
    assert "widgets" not in nb.metadata
    assert [out.output_type for out in nb.cells[0].outputs] == ["stream"] and nb.cells[1].source == "# kept"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_have_no_widget_state(path):
    """A static render (GitHub, nbconvert) would show tqdm's widgets as bars stalled at 0%."""
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata
    assert not [out for cell in nb.cells for out in cell.get("outputs", []) if runner.WIDGET_VIEW in out.get("data", {})]


def _relative_links(text: str) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in target]


@pytest.mark.parametrize("path", [*NOTEBOOKS, runner.REPO_ROOT / "README.md", *sorted(
    (runner.REPO_ROOT / "docs").rglob("*.md"))], ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(path):
    if path.suffix == ".ipynb":
        text = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown")
    else:
        text = path.read_text()
    assert "shared/papers" not in text  # the specs live beside the project, not in a clone of it
    for target in _relative_links(text):
        resolved = (path.parent / target).resolve()
        assert resolved.exists() and runner.REPO_ROOT in resolved.parents, f"{path.name} links to {target}"


TOY_WITH_BAR = "from tqdm.auto import tqdm\nfor i in tqdm(range(2), desc='bar'):\n    print('step', i)"


def test_a_real_run_logs_every_cell_and_keeps_no_widget_state(tmp_path, capsys):
    notebook = write_notebook(tmp_path / "bar.ipynb", TOY_WITH_BAR)
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("## Training the toy"))
    nbformat.write(nb, notebook)
    [result] = runner.reproduce(profile_name="smoke", results_dir=tmp_path / "results",
                                papers_dir=write_paper(tmp_path / "papers", notebook), log=lambda *_: None)
    assert result.status == "ok", result.detail
    log = result.log.read_text()
    # papermill --log-output: each cell as it starts, the cell's own output, and the bar was a widget in the kernel
    assert "Executing Cell 4---" in log and "step 1" in log and "bar:   0%" in log
    executed = nbformat.read(result.output, as_version=4)
    assert "widgets" not in executed.metadata
    assert [out.output_type for out in executed.cells[-1].outputs] == ["stream"]
    out = capsys.readouterr().out  # not a terminal: a status line as the notebook enters each section
    assert f"bar.ipynb: started, ~1 min expected; live log: {result.log}" in out
    assert "bar.ipynb | Training the toy | cell " in out


def test_execute_in_place_stores_no_widget_state_and_writes_after_the_last_run(tmp_path, monkeypatch):
    first, second = (write_notebook(tmp_path / f"{name}.ipynb", TOY_WITH_BAR) for name in ("a", "b"))
    before = first.read_bytes()
    from nbclient import NotebookClient

    execute = NotebookClient.execute
    unchanged_while_running = []
    monkeypatch.setattr(NotebookClient, "execute",
                        lambda self, **kw: unchanged_while_running.append(first.read_bytes() == before)
                        or execute(self, **kw))
    runner.execute_in_place([first, second])
    assert unchanged_while_running == [True, True]  # the second notebook ran beside an unchanged first one
    for notebook in (first, second):
        executed = nbformat.read(notebook, as_version=4)
        assert "widgets" not in executed.metadata
        assert [out.output_type for out in executed.cells[-1].outputs] == ["stream"]


# ---------------------------------------------------------------------------------------- licence and citation
def test_licence_is_the_apache_2_text_pyproject_names():
    import hashlib
    import tomllib

    text = (runner.REPO_ROOT / "LICENSE").read_bytes()
    # the SHA-256 of the standard text (apache.org's LICENSE-2.0.txt, Debian's common-licenses/Apache-2.0)
    assert hashlib.sha256(text).hexdigest() == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    assert tomllib.loads((runner.REPO_ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def test_citation_cites_the_suite_and_every_paper_it_reproduces():
    cff = yaml.safe_load((runner.REPO_ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    assert cff["authors"] == [{"name": "mdbench contributors"}]
    ids = [ref.get("doi") or ref["identifiers"][0]["value"] for ref in cff["references"]]
    for paper in (p for p in PAPERS if p.tier == "paper"):
        citation = yaml.safe_load(paper_file(paper.paper).read_text())["citation"]
        assert [i for i in ids if i in citation], f"CITATION.cff has no reference to {paper.paper}"
    assert len(ids) == sum(p.tier == "paper" for p in PAPERS) == 4

"""What `mdbench reproduce` shows while a notebook runs: its section and cell from papermill's live log."""
from __future__ import annotations

import io

import nbformat
import pytest

from mdbench.progress import Display, LogFollower, NotebookProgress, Status, sections


def _notebook(path, *cells, injected: bool = False):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    if injected:
        cell = nbformat.v4.new_code_cell("profile = 'cpu'")
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(2, cell)
    nbformat.write(nb, path)
    return path


def _parameters(source: str = "profile = 'smoke'"):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def test_each_cell_gets_the_last_heading_above_it_and_papermill_s_injected_cell_is_counted(tmp_path):
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    path = _notebook(tmp_path / "nb.ipynb", md("# Title\ntext"), _parameters(), code("a = 1"),
                     md("Some text, no heading"), md("## Table **1**: `efcm.run`\n### Detail"), code("b = 2"))
    # papermill inserts its injected-parameters cell after the parameters cell: 7 executed cells
    assert sections(path) == ["Title", "Title", "Title", "Title", "Title", "Detail", "Detail"]


def test_a_notebook_that_already_has_an_injected_cell_is_not_shifted(tmp_path):
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    path = _notebook(tmp_path / "nb.ipynb", md("# Title"), _parameters(), md("## Run"), code("x"), injected=True)
    assert sections(path) == ["Title", "Title", "Title", "Run", "Run"]  # papermill replaces the injected cell


def test_the_follower_reads_only_complete_lines_and_keeps_the_last_cell(tmp_path):
    log = tmp_path / "nb.log"
    follower = LogFollower(log)
    assert follower.poll() == 0  # no log yet
    log.write_bytes(b"Executing notebook with kernel: python3\nExecuting Cell 1----\nEnding Cell 1---\nExecuting Ce")
    assert follower.poll() == 1
    with log.open("ab") as out:  # the rest of the cut-off line, and a cell that prints a look-alike mid-line
        out.write(b"ll 12-----\nsays Executing Cell 99- in its output\n")
    assert follower.poll() == 12
    assert follower.poll() == 12


def test_status_line_names_notebook_section_cell_and_times():
    status = Status("efcm.ipynb", 14, 42, "Table 1", elapsed_s=252.9, expected_min=18)
    assert status.text() == "efcm.ipynb | Table 1 | cell 14/42 | 4:12 of ~18 min"
    long = Status("efcm.ipynb", 0, 42, "x" * 80, elapsed_s=0, expected_min=1.5).text()
    assert long.startswith("efcm.ipynb | " + "x" * 47 + "… | cell 0/42") and long.endswith("0:00 of ~1.5 min")
    assert Status("nb.ipynb", 0, 3, "", 0, 1).text().startswith("nb.ipynb | starting | cell 0/3")


def _progress(tmp_path, name: str = "nb") -> NotebookProgress:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    notebook = _notebook(tmp_path / f"{name}.ipynb", _parameters(), md("# Load"), code("x"), md("# Train"), code("y"))
    return NotebookProgress(notebook, tmp_path / f"{name}.log", expected_min=2)


def test_without_a_terminal_a_line_is_printed_as_each_section_starts(tmp_path, capsys):
    progress = _progress(tmp_path)
    display = Display(live=True, stream=io.StringIO())  # not a terminal, as in a CI log
    display.started(progress)
    for cells in (b"", b"Executing Cell 3-\n", b"Executing Cell 4-\n", b"Executing Cell 5-\n"):
        with progress.log.open("ab") as log:
            log.write(cells)
        display.update(progress.status(elapsed_s=61))
    display.finished("nb.ipynb", "ok     toy   1.0 min")
    assert capsys.readouterr().out.splitlines() == [
        f"nb.ipynb: started, ~2 min expected; live log: {progress.log}",
        "nb.ipynb | starting | cell 0/6 | 1:01 of ~2 min",
        "nb.ipynb | Load | cell 3/6 | 1:01 of ~2 min",  # cell 4 is still in Load: no line
        "nb.ipynb | Train | cell 5/6 | 1:01 of ~2 min",
        "ok     toy   1.0 min"]


def test_quiet_prints_only_the_line_of_each_notebook_as_it_ends(tmp_path, capsys):
    progress = _progress(tmp_path)
    display = Display(live=False)
    display.started(progress)
    display.update(progress.status(elapsed_s=1))
    display.finished("nb.ipynb", "failed toy   0.1 min  In [3]: ValueError: boom")
    assert capsys.readouterr().out == "failed toy   0.1 min  In [3]: ValueError: boom\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("jobs", [1, 2])
def test_on_a_terminal_each_running_notebook_has_a_status_line_rewritten_in_place(tmp_path, capsys, jobs):
    terminal = _Terminal()
    display = Display(live=True, stream=terminal)
    runs = [_progress(tmp_path, f"nb{i}") for i in range(jobs)]
    for progress in runs:
        display.started(progress)
    for progress in runs:
        progress.log.write_bytes(b"Executing Cell 3-\n")
        display.update(progress.status(elapsed_s=5))
    shown = terminal.getvalue()
    for i in range(jobs):
        assert f"nb{i}.ipynb | Load | cell 3/6 | 0:05 of ~2 min" in shown
    assert "\r" in shown  # rewritten in place by tqdm
    display.close()
    out = capsys.readouterr().out  # the started lines go above the status lines, on stdout
    assert out.count("started, ~2 min expected") == jobs

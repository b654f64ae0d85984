"""What ``mdbench reproduce`` shows while notebooks run: which notebook, section and cell, time spent and expected.

papermill runs each notebook with ``--log-output``, so its live log (``<notebook>.log`` beside the executed notebook)
gets a line ``Executing Cell N---...`` as each cell starts, then everything the cell prints. :class:`LogFollower`
reads the log as it grows; :func:`sections` names each cell's section (the nearest markdown heading above it). The
terminal shows one status line per running notebook, the log keeps the full text.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CELL_START = re.compile(rb"^Executing Cell (\d+)-", re.MULTILINE)  # papermill's log line as a cell starts
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
SECTION_WIDTH = 48  # characters of a section title on the status line


def sections(notebook: Path) -> list[str]:
    """The section of each cell as papermill numbers the executed notebook: the last markdown heading at or above the
    cell ("" before the first). papermill inserts its ``injected-parameters`` cell after the cell tagged
    ``parameters``, unless the notebook already has one, which it replaces."""
    cells = json.loads(notebook.read_text())["cells"]
    injects = not any("injected-parameters" in _tags(cell) for cell in cells)
    found, current = [], ""
    for cell in cells:
        if cell["cell_type"] == "markdown":
            headings = HEADING.findall(_source(cell))
            current = _plain(headings[-1]) if headings else current
        found.append(current)
        if injects and "parameters" in _tags(cell):
            found.append(current)
    return found


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: dict[str, Any]) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _plain(heading: str) -> str:
    """A heading without markdown emphasis and code marks."""
    return re.sub(r"[*`]", "", heading).strip()


class LogFollower:
    """The cell papermill last started, read from what its log gained since the previous :meth:`poll`."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""  # an unfinished last line, completed by the next read
        self.cell = 0  # 1-based, as papermill counts; 0 before the first cell

    def poll(self) -> int:
        """The number of the cell that is running now (0 before the first)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return self.cell
        self.offset += len(chunk)
        lines, _, self.partial = (self.partial + chunk).rpartition(b"\n")
        starts = CELL_START.findall(lines)
        if starts:
            self.cell = int(starts[-1])
        return self.cell


@dataclass(frozen=True)
class Status:
    """Where a running notebook is: its cell (of ``cells``) and that cell's section, time spent and expected."""

    notebook: str
    cell: int
    cells: int
    section: str
    elapsed_s: float
    expected_min: float

    def text(self) -> str:
        """``efcm.ipynb | Table 1 | cell 14/42 | 4:12 of ~18 min``."""
        section = self.section if len(self.section) <= SECTION_WIDTH else self.section[:SECTION_WIDTH - 1] + "…"
        minutes, seconds = divmod(int(self.elapsed_s), 60)
        return (f"{self.notebook} | {section or 'starting'} | cell {self.cell}/{self.cells} | "
                f"{minutes}:{seconds:02d} of ~{self.expected_min:g} min")


class NotebookProgress:
    """The status of one notebook papermill is executing, from its live log."""

    def __init__(self, notebook: Path, log: Path, expected_min: float):
        self.notebook, self.log, self.expected_min = notebook, log, expected_min
        self.sections = sections(notebook)
        self.follower = LogFollower(log)

    def status(self, elapsed_s: float) -> Status:
        """Where the notebook is now, ``elapsed_s`` after it started."""
        cell = self.follower.poll()
        section = self.sections[min(cell, len(self.sections)) - 1] if cell else ""
        return Status(self.notebook.name, cell, len(self.sections), section, elapsed_s, self.expected_min)


class Display:
    """The terminal's view of a run. ``live`` on a terminal: one status line per running notebook, rewritten in place
    (tqdm); ``live`` elsewhere (a CI log): a status line each time a notebook enters a new section; not ``live``
    (``--quiet``): only the line :meth:`finished` prints, one per notebook. Lines go to stdout; the status lines
    rewritten in place to ``stream`` (default stderr)."""

    def __init__(self, live: bool, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr
        self.live = live
        self.in_place = live and self.stream.isatty()
        self.bars: dict[str, Any] = {}
        self.shown: dict[str, str] = {}  # notebook -> the section last printed (not in place)

    def started(self, progress: NotebookProgress) -> None:
        """Say where the notebook's live log is."""
        if not self.live:
            return
        self._print(f"{progress.notebook.name}: started, ~{progress.expected_min:g} min expected; "
                    f"live log: {progress.log}")
        if self.in_place:
            from tqdm import tqdm

            self.bars[progress.notebook.name] = tqdm(bar_format="{desc}", file=self.stream, leave=False)

    def update(self, status: Status) -> None:
        """Show the notebook's status (in place, or as a line when its section changed)."""
        if not self.live:
            return
        if self.in_place:
            bar, text = self.bars[status.notebook], status.text()
            if text != bar.desc:  # it changes once a second at most: no need to redraw it at every poll
                bar.set_description_str(text)
        elif self.shown.get(status.notebook) != status.section:
            self.shown[status.notebook] = status.section
            print(status.text(), flush=True)

    def finished(self, notebook: str, line: str) -> None:
        """Remove the notebook's status line and print ``line`` (its result)."""
        bar = self.bars.pop(notebook, None)
        if bar is not None:
            bar.close()
        self._print(line)

    def close(self) -> None:
        """Remove every status line still shown (a stopped run)."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def _print(self, line: str) -> None:
        if self.in_place:
            from tqdm import tqdm

            tqdm.write(line)  # above the status lines
        else:
            print(line, flush=True)

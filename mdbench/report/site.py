"""Build the report site from a results folder: an index, one page per (paper, profile) run, the notebooks.

Layout of the site (every link relative, so the folder can be opened from disk or served anywhere)::

    index.html                       every run: its claim tally and headline claim; the cross-paper figures
    style.css
    <paper>/<profile>/index.html     the run's known problems (its KNOWN_PROBLEMS.md), claims (colour-coded), tables,
                                     figures; its CSVs and figures beside it
    <paper>/<profile>/<notebook>.html  the executed notebook (:mod:`mdbench.report.notebooks`)
    cross-paper/                     the figures of ``<results>/pareto/`` where there are some

A run is a ``<results>/<paper>/<profile>/`` folder with records, for every paper under ``mdbench/papers/``, in the
order ``mdbench reproduce`` runs them. The site is built in a temporary folder beside ``out`` and then put in its
place, so an interrupted build leaves the previous site whole; ``out`` is replaced only if it holds a site built
here (or nothing), never the results folder or a folder that holds it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pandas as pd

from mdbench import verdicts
from mdbench.paper_yaml import PAPERS_DIR
from mdbench.report import notebooks, tables
from mdbench.results import NOT_RUN, load_reference
from mdbench.runner import load_papers

REPORT_DIR = Path(__file__).resolve().parents[2] / "build" / "report"
CROSS_PAPER_DIR = "pareto"  # <results>/pareto/: the cross-paper figures, shown on the index when present
CROSS_PAPER_OUT = "cross-paper"
MARKER = ".mdbench-report"  # in a site built here: the only kind of folder a build replaces
FIGURE_TYPES = (".svg", ".png")  # shown in a page, in this order of preference; other formats are linked
LINKED_TYPES = (".pdf", ".csv")
VERDICTS = [(verdicts.HOLDS, "holds"), (verdicts.FAILS, "fails"), (verdicts.INCONCLUSIVE, "inconclusive"),
            (NOT_RUN, "not-run")]
NOTEBOOK_SUFFIX = ".executed.ipynb"
# what a review found wrong with a run, beside its records; a rerun that replaces the folder drops it with the run
KNOWN_PROBLEMS = "KNOWN_PROBLEMS.md"


class ReportError(ValueError):
    """Nothing to report, or an output folder the build must not replace."""


@dataclass
class Figure:
    """A figure of a page: its ``name`` (file stem), the file shown (``src``) and its other formats (``others``)."""

    name: str
    src: str
    others: list[str]


@dataclass
class Run:
    """One (paper, profile) run of the results folder and what the index says of it."""

    paper: str
    profile: str
    dir: Path
    title: str
    citation: str
    tally: dict[str, int]
    headline: list[dict[str, str]]
    problems: str = ""  # its KNOWN_PROBLEMS.md as HTML (Markdown rendered, raw HTML escaped), or nothing

    @property
    def href(self) -> str:
        return f"{self.paper}/{self.profile}/index.html"


def find_runs(results_dir: Path, papers_dir: Path = PAPERS_DIR) -> list[tuple[str, Path]]:
    """``(paper, folder)`` of every run under ``results_dir`` (a profile folder with records), papers in the order
    ``mdbench reproduce`` runs them, profiles by name."""
    runs = []
    for paper in load_papers(papers_dir):
        runs += [(paper.paper, records.parent) for records in sorted((results_dir / paper.paper).glob("*/records"))
                 if records.is_dir()]
    return runs


def _tally(claims: pd.DataFrame) -> dict[str, int]:
    """Claim checks by verdict (:func:`mdbench.verdicts.tally`; "inconclusive (n=1)" counts as inconclusive)."""
    if claims.empty:
        return {status: 0 for status, _ in VERDICTS}
    row = verdicts.tally(claims).iloc[0]
    return {status: int(row[status]) for status, _ in VERDICTS}


def _headline(claims: pd.DataFrame) -> list[dict[str, str]]:
    """The checks of a run's first claim (the paper.yaml lists its headline first), one per dataset."""
    if claims.empty:
        return []
    first = claims[claims["claim"] == claims["claim"].iloc[0]]
    return [{"text": c.text, "dataset": c.dataset, "status": c.status,
             "css": tables.verdict_class(c.status), "difference": tables.number(c.difference).text,
             "ci_low": tables.number(c.ci_low).text, "ci_high": tables.number(c.ci_high).text}
            for c in first.itertuples(index=False)]


def _figures(folder: Path, dest: Path, href: str = "") -> list[Figure]:
    """The figures in ``folder`` (one per stem, SVG over PNG), copied with their other formats into ``dest``, which
    a page reaches at ``href``."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    figures = []
    for stem in sorted({p.stem for p in files if p.suffix in FIGURE_TYPES}):
        mine = {p.suffix: p.name for p in files if p.stem == stem and p.suffix in (*FIGURE_TYPES, *LINKED_TYPES)}
        src = next(mine[suffix] for suffix in FIGURE_TYPES if suffix in mine)
        others = [name for name in mine.values() if name != src]
        for name in (src, *others):
            shutil.copy2(folder / name, dest / name)
        figures.append(Figure(name=stem, src=href + src, others=[href + name for name in others]))
    return figures


def _known_problems(folder: Path) -> str:
    """``folder``'s :data:`KNOWN_PROBLEMS` as HTML, or "" without one."""
    import mistune

    path = folder / KNOWN_PROBLEMS
    if not path.is_file():
        return ""
    return str(mistune.create_markdown(escape=True)(path.read_text(encoding="utf-8")))


def _write_run(env: jinja2.Environment, run: Run, claims: pd.DataFrame, order: list[str], site: Path,
               results_name: str) -> None:
    """The run's page, its CSVs and figures, and its rendered notebooks, under ``site/<paper>/<profile>/``; its
    tables named in ``order`` (the paper.yaml's) come first, in that order."""
    dest = site / run.paper / run.profile
    dest.mkdir(parents=True)
    csvs = sorted(run.dir.glob("*.csv"), key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))
    shown, views = [], []
    for path in csvs:
        shutil.copy2(path, dest / path.name)
        table = tables.read_table(path)
        if table is None:
            views.append(path.name)
        elif table.name != "claims":
            shown.append(table)
    pages = []
    for path in sorted(run.dir.glob(f"*{NOTEBOOK_SUFFIX}")):
        name = path.name.removesuffix(NOTEBOOK_SUFFIX)
        page = f"{name}.html"
        (dest / page).write_text(notebooks.render_notebook(path, f"{run.title} ({run.profile})", "index.html"),
                                 encoding="utf-8")
        shutil.copy2(path, dest / path.name)
        pages.append({"name": name, "href": page, "source": path.name})
    html = env.get_template("run.html.j2").render(
        root="../../", results_name=results_name, verdicts=VERDICTS, run=run, notebooks=pages,
        n_records=len(list((run.dir / "records").glob("*.json"))), tables=shown, views=views,
        claims=tables.claims_table(claims.drop(columns=["paper", "profile"])) if not claims.empty else None,
        figures=_figures(run.dir, dest))
    (dest / "index.html").write_text(html, encoding="utf-8")


def _check_out(results_dir: Path, out: Path) -> None:
    """Refuse an output folder that is or holds or lies in the results folder, or that holds anything but a site
    built here."""
    res, dest = results_dir.resolve(), out.resolve()
    if res == dest or res.is_relative_to(dest) or dest.is_relative_to(res):
        raise ReportError(f"--out {out} and the results folder {results_dir} overlap; write the site elsewhere "
                          f"(default {REPORT_DIR})")
    if dest.exists() and not (dest / MARKER).exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ReportError(f"{out} exists and is not a site built by mdbench report; choose another --out or "
                          "empty it")


def _put_in_place(staging: Path, out: Path) -> None:
    """Move the finished site ``staging`` to ``out``, replacing a previous site there."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-old-{out.name}-"))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def build_site(results_dir: Path, out: Path = REPORT_DIR, papers_dir: Path = PAPERS_DIR) -> list[Run]:
    """Build the report of ``results_dir`` into ``out``; returns the runs it shows (in the index's order)."""
    results_dir, out = Path(results_dir), Path(out)
    found = find_runs(results_dir, papers_dir)
    if not found:
        raise ReportError(f"no results under {results_dir}: no <paper>/<profile>/records/ folder of a paper in "
                          f"{papers_dir}; run `mdbench reproduce` first or pass --results-dir")
    _check_out(results_dir, out)
    claims = verdicts.summary(results_dir)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(notebooks.TEMPLATES / "site"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the site is for reading
    try:
        runs = []
        for paper, folder in found:
            reference = load_reference(paper, papers_dir / paper / "paper.yaml")
            mine = claims[(claims["paper"] == paper) & (claims["profile"] == folder.name)]
            run = Run(paper=paper, profile=folder.name, dir=folder, title=reference.title or paper,
                      citation=reference.citation, tally=_tally(mine), headline=_headline(mine),
                      problems=_known_problems(folder))
            _write_run(env, run, mine, list(reference.reported), staging, results_dir.name)
            runs.append(run)
        figures = []
        if (results_dir / CROSS_PAPER_DIR).is_dir():
            (staging / CROSS_PAPER_OUT).mkdir()
            figures = _figures(results_dir / CROSS_PAPER_DIR, staging / CROSS_PAPER_OUT, f"{CROSS_PAPER_OUT}/")
        total = {status: sum(r.tally[status] for r in runs) for status, _ in VERDICTS}
        (staging / "index.html").write_text(env.get_template("index.html.j2").render(
            root="", results_name=results_dir.name, verdicts=VERDICTS, runs=runs,
            papers=len({r.paper for r in runs}), total={**total, "checks": sum(total.values())},
            cross_paper=figures, cross_paper_dir=CROSS_PAPER_DIR), encoding="utf-8")
        shutil.copy2(notebooks.TEMPLATES / "site" / "style.css", staging / "style.css")
        (staging / MARKER).write_text("a site built by `mdbench report`; the next build replaces this folder\n")
        _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return runs

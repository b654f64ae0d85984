"""The cross-paper Pareto: every method of every paper on the cost of the model it deploys (parameters, FLOPs, CPU
latency) against its task metric, with the frontier marked; built from the stored records, no retraining.

Each paper says in the ``pareto:`` section of its paper.yaml which records feed it::

    pareto:
      metric: {table: table1, metric: auc, datasets: [pbc, isic2017], label: "bag AUC (%)"}
      input: "one 256x256 patch"                      # what the costs were measured on, shown with them
      axes:                                           # a cost axis: the records of one table and metric
        params_m: {table: table2, dataset: "...", metric: params_m}
        gflops: {table: table2, dataset: "...", metric: gflops_patch}
        latency_ms: {table: table_b, dataset: real, metric: seconds_per_case, scale: 1000}
      deployed:                                       # method -> the row measuring the model it deploys
        default: "{student}"                          # "{key}": the metric record's config[key]; a method
                                                      # "a/b" (RD's method/student) may be listed as "a"
      stand_ins: [litemedsam_stem]                    # rows of cheap stand-ins for a model: a method deploying
                                                      # one is left out (its cost is not the real model's)
        teacher_clam: teacher                         # one row for every axis table ...
        LiteMedSAM: {efficiency: LiteMedSAM, table_b: "LiteMedSAM (PyTorch)"}   # ... or one per table

The methods are the rows of the metric's table; with several datasets, a method's metric is its mean over them.
An axis the paper's section leaves out, or none of whose records exist at the profile (DAFT times Table B at cpu
only), is shown as "not recorded"; a method that ran on a stand-in (``stand_ins``) keeps its line in the CSV, with no
cost, and is not plotted; so is a method without the metric on every dataset (RD's gpu claim students ran on one of
three), which keeps the costs that were measured but no metric, as a mean over fewer datasets is not comparable.
Metrics differ between papers, so each paper has its own row of panels, colour and y axis: points are compared
within a paper only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdbench import figures
from mdbench.paper_yaml import PAPERS_DIR, PaperFileError, known_papers, paper_file, read_paper_file
from mdbench.results import Record, load_records, results_root

AXES = {"params_m": "deployed parameters (M)", "gflops": "GFLOPs per input", "latency_ms": "CPU latency (ms per input)"}
OUT_DIR = "pareto"  # <results>/pareto/: the cross-paper figure and its CSV
COLUMNS = ["paper", "method", "name", "metric", "metric_label", "datasets", *AXES, "deployed", "input",
           *(f"frontier_{axis}" for axis in AXES)]


class ParetoError(PaperFileError):
    """A ``pareto:`` section or records that cannot make the Pareto points (a missing record, an unknown key)."""


@dataclass(frozen=True)
class Axis:
    """One cost axis of a paper: the records of ``table`` / ``dataset`` / ``metric``, times ``scale``."""

    table: str
    dataset: str
    metric: str
    scale: float = 1.0


@dataclass(frozen=True)
class Spec:
    """A paper's ``pareto:`` section (module docstring)."""

    paper: str
    table: str
    metric: str
    datasets: tuple[str, ...]
    label: str
    input: str
    axes: dict[str, Axis]
    deployed: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True
    stand_ins: tuple[str, ...] = ()

    def deployed_row(self, method: str, table: str, config: Mapping[str, Any]) -> str:
        """The row of ``table`` that measures the model ``method`` deploys (``{key}`` filled from ``config``)."""
        where = next((self.deployed[key] for key in (method, method.split("/")[0], "default") if key in self.deployed),
                     None)
        if where is None:
            raise ParetoError(f"{self.paper}: pareto.deployed names no model for the method {method!r} (and has no "
                              "default)")
        row = where.get(table) if isinstance(where, dict) else where
        if not isinstance(row, str):
            raise ParetoError(f"{self.paper}: pareto.deployed.{method} names no row of the table {table!r}")
        try:
            return row.format_map(dict(config))
        except KeyError as err:
            raise ParetoError(f"{self.paper}: pareto.deployed.{method} = {row!r} needs {err} in the config of the "
                              "metric's records, which lack it") from err


def load_spec(paper: str, papers_dir: Path = PAPERS_DIR) -> Spec | None:
    """``paper``'s ``pareto:`` section, or None where its paper.yaml has none; a malformed one is a ParetoError."""
    path = paper_file(paper, papers_dir)
    section = read_paper_file(path).get("pareto")
    if section is None:
        return None
    try:
        metric = section["metric"]
        datasets = metric["datasets"]
        axes = {name: Axis(table=a["table"], dataset=a["dataset"], metric=a["metric"], scale=float(a.get("scale", 1)))
                for name, a in (section.get("axes") or {}).items()}
        spec = Spec(paper=paper, table=metric["table"], metric=metric["metric"],
                    datasets=tuple([datasets] if isinstance(datasets, str) else datasets), label=metric["label"],
                    input=section["input"], axes=axes, deployed=dict(section.get("deployed") or {}),
                    higher_is_better=bool(metric.get("higher_is_better", True)),
                    stand_ins=tuple(section.get("stand_ins") or ()))
    except (KeyError, TypeError, ValueError) as err:
        raise ParetoError(f"{path}: the pareto section lacks or mistypes {err}; see mdbench/pareto.py") from err
    unknown = set(spec.axes) - set(AXES)
    if unknown:
        raise ParetoError(f"{path}: pareto.axes has {sorted(unknown)}; the axes are {list(AXES)}")
    if not spec.datasets:
        raise ParetoError(f"{path}: pareto.metric.datasets is empty")
    return spec


def paper_points(spec: Spec, records: Sequence[Record], names: Mapping[str, str]) -> pd.DataFrame:
    """One line per method of ``spec``'s metric table: its metric (mean over the spec's datasets) and the cost of the
    model it deploys on each axis (NaN where the section has no such axis). Columns: :data:`COLUMNS` but the
    frontier ones.

    Args:
        records: the paper's records at one profile.
        names: the paper's human method names (:func:`mdbench.figures.method_names`).
    """
    by_key = {(r.table, r.dataset, r.row, r.metric): r for r in records}
    # an axis none of whose records exist at this profile is not drawn (module docstring)
    measured = {(r.table, r.dataset, r.metric) for r in records}
    unmeasured = {name for name, a in spec.axes.items() if (a.table, a.dataset, a.metric) not in measured}
    if spec.axes and unmeasured == set(spec.axes):
        unmeasured = set()  # no cost at all: a run made before the paper recorded costs, refused below
    metric = [r for r in records if r.table == spec.table and r.metric == spec.metric and r.dataset in spec.datasets]
    if not metric:
        raise ParetoError(f"{spec.paper}: no record of {spec.table}/{spec.metric} on {list(spec.datasets)}; run its "
                          "notebook first")
    lines = []
    for method in dict.fromkeys(r.row for r in metric):
        mine = {r.dataset: r for r in metric if r.row == method}
        # a mean over fewer datasets is not comparable with the others': such a method keeps its costs, not plotted
        missing = [d for d in spec.datasets if d not in mine]
        config = next(iter(mine.values())).config
        line: dict[str, Any] = {
            "paper": spec.paper, "method": method, "name": figures.human(names, method),
            "metric": math.nan if missing else float(np.mean([mine[d].mean for d in spec.datasets])),
            "metric_label": spec.label, "datasets": ", ".join(spec.datasets), "input": spec.input}
        deployed = []
        for axis in AXES:
            if axis not in spec.axes or axis in unmeasured:
                line[axis] = math.nan
                continue
            a = spec.axes[axis]
            row = spec.deployed_row(method, a.table, config)
            rec = by_key.get((a.table, a.dataset, row, a.metric))
            if rec is None and missing:  # not plotted: its model need not have been costed
                line[axis] = math.nan
                continue
            if rec is None:
                raise ParetoError(f"{spec.paper}: no record {a.table}/{a.dataset}/{row}/{a.metric} for the cost of "
                                  f"{method!r} ({axis})")
            line[axis] = math.nan if row in spec.stand_ins else rec.mean * a.scale
            deployed.append(row)
        line["deployed"] = " / ".join(f"{row} (stand-in: not plotted)" if row in spec.stand_ins else row
                                      for row in dict.fromkeys(deployed))
        if missing:
            line["deployed"] += f" (no {spec.metric} on {', '.join(missing)}: not plotted)"
        lines.append(line)
    if all(math.isnan(line["metric"]) for line in lines):
        raise ParetoError(f"{spec.paper}: no method has {spec.metric} records on all of {list(spec.datasets)} (e.g. "
                          f"{method!r} has no {spec.metric} record on {missing})")
    return pd.DataFrame(lines)


def frontier(cost: Sequence[float], score: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """Which points are on the Pareto frontier of lower ``cost`` and better ``score``: a point is, unless another
    has a cost no higher and a score no worse, one of them strictly. NaN points are never on it.

    Args:
        cost, score: (N,) each.

    Returns:
        (N,) bool.
    """
    c, s = np.asarray(cost, dtype=float), np.asarray(score, dtype=float)
    if c.shape != s.shape or c.ndim != 1:
        raise ValueError(f"cost and score must be two 1-D sequences of one length, not {c.shape} and {s.shape}")
    if not higher_is_better:
        s = -s
    valid = np.isfinite(c) & np.isfinite(s)
    # dominated[i, j]: point j dominates point i
    no_worse = (c[None, :] <= c[:, None]) & (s[None, :] >= s[:, None])
    better = (c[None, :] < c[:, None]) | (s[None, :] > s[:, None])
    dominated = (no_worse & better & valid[None, :]).any(axis=1)
    return valid & ~dominated


def build(papers: Sequence[str] | None = None, profile: str = "cpu", root: Path | None = None,
          papers_dir: Path = PAPERS_DIR) -> pd.DataFrame:
    """The Pareto points of ``papers`` (default: every paper with a pareto section) from their records at
    ``profile`` under ``root`` (default :func:`mdbench.results.results_root`), with a ``frontier_<axis>`` column
    per axis (frontier within the paper). Columns: :data:`COLUMNS`."""
    root = Path(root) if root is not None else results_root()
    known = known_papers(papers_dir)
    specs = [load_spec(p, papers_dir) for p in (papers or known)]
    chosen = [s for s in specs if s is not None]
    if papers and len(chosen) < len(papers):
        lacking = [p for p, s in zip(papers, specs, strict=True) if s is None]
        raise ParetoError(f"no pareto section in the paper.yaml of {lacking}")
    if not chosen:
        raise ParetoError("no paper has a pareto section in its paper.yaml")
    frames = []
    for spec in chosen:
        records = load_records(root / spec.paper / profile / "records")
        if not records:
            raise ParetoError(f"no records of {spec.paper} at profile {profile!r} under {root}")
        points = paper_points(spec, records, figures.method_names(spec.paper, papers_dir))
        for axis in AXES:
            points[f"frontier_{axis}"] = frontier(points[axis], points.metric, spec.higher_is_better)
        frames.append(points)
    return pd.concat(frames, ignore_index=True)[COLUMNS]


CAPTION = ("Each paper's methods on the cost of the model each deploys (parameters, FLOPs per input, median CPU "
           "latency per input at batch 1, from the records of one machine) against the paper's own task metric. "
           "Metrics and inputs differ between papers, so each paper has its own row, colour and y axis: compare "
           "points within a row. Filled points joined by the step line: the Pareto frontier (no other method of "
           "the paper is cheaper and at least as good); hollow points are dominated. A log axis only where the "
           "costs span at least a decade.")


@figures.styled
def plot(points: pd.DataFrame, profile: str = "cpu"):
    """One row of panels per paper, one column per axis of :data:`AXES`: each method's metric against its cost,
    frontier filled and joined, labels by human name. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if points.empty:
        raise ParetoError("no Pareto points to plot")
    papers = list(dict.fromkeys(points.paper))
    colours = dict(zip(papers, sns.color_palette("colorblind", len(papers)), strict=True))
    fig, axes = plt.subplots(len(papers), len(AXES), figsize=(5.2 * len(AXES), 4.0 * len(papers)), squeeze=False)
    for line, paper in zip(axes, papers, strict=True):
        mine = points[points.paper == paper]
        for ax, axis in zip(line, AXES, strict=True):
            _panel(ax, mine, axis, colours[paper])
        line[0].set_ylabel(f"{paper}: {mine.metric_label.iloc[0]}\n(mean over {mine.datasets.iloc[0]})")
        stand_in = mine.deployed.str.contains("stand-in")
        partial = mine.metric.isna() & ~stand_in
        why = [f"{', '.join(mine.name[rows])} ({reason})" for rows, reason in (
            (stand_in, "ran on a stand-in model"), (partial, "not run on every dataset of the mean"))
            if rows.any()]
        if why:
            line[0].annotate("\n".join(_wrap(f"not plotted: {'; '.join(why)}", 110)), (0, -0.32),
                             xycoords="axes fraction", fontsize=6, color="0.4", annotation_clip=False, va="top")
    whose = "every method of every paper" if len(papers) > 1 else f"every method of {papers[0]}"
    fig.suptitle(f"Task metric against deployed cost, {whose} (profile {profile})", fontsize=12)
    fig.text(0.01, -0.01, "\n".join(_wrap(CAPTION, 190)), fontsize=8, va="top", ha="left")
    fig.tight_layout()
    return fig


def _panel(ax, mine: pd.DataFrame, axis: str, colour) -> None:
    """One paper's methods on one cost axis (or a note where the axis is not recorded)."""
    shown = mine[np.isfinite(mine[axis]) & np.isfinite(mine.metric)]
    if shown.empty:
        ax.text(0.5, 0.5, f"{AXES[axis]}:\nnot recorded by this paper's notebook\nat this profile", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    on = shown[f"frontier_{axis}"].astype(bool)
    edge = shown[on].sort_values(axis)
    ax.step(edge[axis], edge.metric, where="post", color=colour, lw=1.2, alpha=0.8)
    ax.scatter(shown[axis][on], shown.metric[on], color=colour, s=36, zorder=3, label="on the frontier")
    ax.scatter(shown[axis][~on], shown.metric[~on], facecolor="white", edgecolor=colour, s=36, zorder=3,
               label="dominated")
    figures.set_scale(ax, "x", shown[axis])
    ax.set_xlabel(f"{AXES[axis]}\n{mine.input.iloc[0]}", fontsize=8)
    figures.label_points(ax, list(shown[axis]), list(shown.metric), list(shown.name), radius_px=12, fontsize=6)
    ax.legend(loc="best", fontsize=6)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def write(points: pd.DataFrame, out_dir: Path, stem: str, profile: str = "cpu") -> list[Path]:
    """Write the points as ``<stem>.csv`` and their figure as ``<stem>.svg`` and ``<stem>.png`` under ``out_dir``;
    returns the paths."""
    import matplotlib.pyplot as plt

    from mdbench.io import atomic_write

    fig = plot(points, profile)
    try:
        paths = figures.save(fig, Path(out_dir) / stem)
    finally:
        plt.close(fig)
    return [*paths, atomic_write(Path(out_dir) / f"{stem}.csv", csv_text(points))]


def csv_text(points: pd.DataFrame) -> str:
    """The points as the CSV :func:`write` writes (6 significant digits)."""
    return points.to_csv(index=False, float_format="%.6g")


def regenerate(papers: Sequence[str] | None = None, profile: str = "cpu", root: Path | None = None,
               papers_dir: Path = PAPERS_DIR) -> list[Path]:
    """``mdbench figures``: each paper's Pareto beside its records (``<root>/<paper>/<profile>/pareto_costs.*``, where
    it records a cost) and,
    where every paper with a pareto section is included, the cross-paper one (``<root>/pareto/pareto_<profile>.*``).
    Returns the paths written."""
    root = Path(root) if root is not None else results_root()
    points = build(papers, profile, root, papers_dir)
    written = []
    for paper, mine in points.groupby("paper", sort=False):
        if mine[list(AXES)].notna().any().any():  # a paper that records no cost has no figure of its own
            written += write(mine.reset_index(drop=True), root / str(paper) / profile, "pareto_costs", profile)
    if not papers:
        written += write(points, root / OUT_DIR, f"pareto_{profile}", profile)
    return written

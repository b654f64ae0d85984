"""One figure style for every paper: a seaborn theme, human method names, labels that do not overlap, axis scales
that suit the range shown, ×N on speed-up bars, and one save helper that writes SVG plus a 300-dpi PNG.

Every plotting function of the papers is wrapped in :func:`styled`, so a figure looks the same whether a notebook
or ``mdbench figures`` draws it. Method names come from the ``names:`` mapping of each paper's paper.yaml
(``fpd_ts_etc: "FPD + TransScan + ETC"``), read by :func:`method_names`; a key it lacks is shown as it is, and
:func:`missing_names` lists such keys so that a test can insist on none.

matplotlib, seaborn and adjustText are imported inside the functions, so that importing this module (the CLI does)
stays fast.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mdbench.io import atomic_write
from mdbench.paper_yaml import PAPERS_DIR, PaperFileError, paper_file, read_paper_file

PNG_DPI = 300
FORMATS = ("svg", "png")  # every figure is written in each, as <stem>.<format>
ADJUST_ITERATIONS = 1000  # adjustText's iterations to move labels apart
LOG_MIN_DECADES = 1.0  # a positive range spanning fewer decades than this is shown on a linear axis
THEME: dict[str, Any] = {
    "context": "paper", "style": "whitegrid", "palette": "colorblind", "font_scale": 1.1,
    "rc": {"axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7, "legend.title_fontsize": 8,
           "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": 100, "savefig.bbox": "tight",
           "svg.fonttype": "none", "axes.spines.top": False, "axes.spines.right": False},
}

F = TypeVar("F", bound=Callable[..., Any])


def apply_style() -> None:
    """Set :data:`THEME` (seaborn's ``set_theme``) for every figure drawn after it; idempotent."""
    import seaborn as sns

    sns.set_theme(**THEME)


def styled(plot: F) -> F:
    """Decorator for a plotting function: :func:`apply_style` before it draws, and numpy's global random state
    seeded while it draws (seaborn's strip-plot jitter draws from it) and given back after, so that the same data
    make the same figure without changing any random draw outside it."""
    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import numpy as np

        apply_style()
        state = np.random.get_state()
        np.random.seed(0)
        try:
            return plot(*args, **kwargs)
        finally:
            np.random.set_state(state)
    return wrapper  # type: ignore[return-value]


def save(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``<stem>.svg`` and ``<stem>.png`` (300 dpi), each atomically; returns the paths.

    ``stem``: the path without a suffix (a suffix it has is replaced)."""
    import matplotlib

    stem = Path(stem)
    paths = []
    for fmt in FORMATS:
        buffer = io.BytesIO()
        # no creation date and fixed element ids: redrawing the same figure rewrites the same bytes
        with matplotlib.rc_context({"svg.hashsalt": "mdbench"}):
            fig.savefig(buffer, format=fmt, dpi=PNG_DPI, bbox_inches="tight",
                        metadata={"Date": None} if fmt == "svg" else {})
        paths.append(atomic_write(stem.with_suffix(f".{fmt}"), buffer.getvalue()))
    return paths


# ---------------------------------------------------------------------------------------------------- names
def method_names(paper: str, papers_dir: Path = PAPERS_DIR) -> dict[str, str]:
    """The ``names:`` mapping of ``paper``'s paper.yaml: raw method key -> human name (empty where it has none)."""
    path = paper_file(paper, papers_dir)
    names = read_paper_file(path).get("names") or {}
    if not isinstance(names, dict) or not all(isinstance(v, str) and v.strip() for v in names.values()):
        raise PaperFileError(f"{path}: names must map each method key to a non-empty human name")
    return {str(key): value for key, value in names.items()}


def human(names: Mapping[str, str], key: str) -> str:
    """The human name of ``key``: ``names[key]``; else, for a key of parts joined by ``/`` (RD's
    ``method/student``) that ``names`` names each, "Method (Student)"; else the key as it is (:func:`missing_names`
    finds those)."""
    if key in names:
        return names[key]
    parts = key.split("/")
    if len(parts) > 1 and all(part in names for part in parts):
        return f"{names[parts[0]]} ({', '.join(names[part] for part in parts[1:])})"
    return key


def missing_names(names: Mapping[str, str], keys: Iterable[str]) -> list[str]:
    """The keys of ``keys`` that :func:`human` shows as they are, for lack of a name in ``names``; sorted."""
    return sorted({key for key in keys if human(names, key) == key and key not in names})


# ------------------------------------------------------------------------------------------------ drawing aids
def suits_log(values: Iterable[float], min_decades: float = LOG_MIN_DECADES) -> bool:
    """Whether ``values`` belong on a log axis: all positive and spanning at least ``min_decades`` decades."""
    import numpy as np

    array = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(array) == 0 or (array <= 0).any():
        return False
    return bool(np.log10(array.max() / array.min()) >= min_decades)


def set_scale(ax, axis: str, values: Iterable[float]) -> str:
    """Set ``ax``'s ``axis`` ("x" or "y") to log where :func:`suits_log` says so, else linear; returns the scale. A
    log axis is labelled with plain numbers at 1, 2 and 5 of each decade (0.2, 0.5, 1, 2, ...), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', not {axis!r}")
    scale = "log" if suits_log(values) else "linear"
    (ax.set_xscale if axis == "x" else ax.set_yscale)(scale)
    if scale == "log":
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        target.set_minor_formatter(NullFormatter())
    return scale


def _groups(ax, xs: Sequence[float], ys: Sequence[float], radius_px: float) -> list[list[int]]:
    """The points within ``radius_px`` display pixels of a group's first point, grouped (indices)."""
    import numpy as np

    ax.autoscale_view()
    where = ax.transData.transform(np.column_stack([xs, ys]).astype(float))
    groups: list[list[int]] = []
    for i, point in enumerate(where):
        home = next((g for g in groups if np.hypot(*(where[g[0]] - point)) <= radius_px), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def label_points(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], radius_px: float = 6,
                 **text_kwargs: Any) -> list:
    """Write ``labels`` beside the points ``(xs, ys)`` and move them (adjustText) until none overlaps another label
    or a point; a label moved away from its point gets a thin line to it. Points that (nearly) coincide, within
    ``radius_px`` pixels, share one label that lists their names, highest point first. Returns the text
    artists.

    The figure is laid out first (``tight_layout``): labels are placed for the axes' final size in pixels, which a
    ``tight_layout`` after them would otherwise change, bringing them back together."""
    from adjustText import adjust_text

    if not len(xs) == len(ys) == len(labels):
        raise ValueError(f"{len(xs)} x values, {len(ys)} y values and {len(labels)} labels: one of each per point")
    if not len(xs):
        return []
    ax.figure.tight_layout()
    texts = []
    for group in _groups(ax, xs, ys, radius_px):
        group = sorted(group, key=lambda i: -ys[i])
        text = ax.text(xs[group[0]], ys[group[0]], "\n".join(labels[i] for i in group),
                       fontsize=text_kwargs.get("fontsize", 7), **{k: v for k, v in text_kwargs.items()
                                                                    if k != "fontsize"})
        text.set_in_layout(False)  # a later tight_layout must not resize the axes the labels were placed for
        texts.append(text)
    # a fixed number of iterations, not adjustText's default time limit: the same figure on any machine, at any load
    adjust_text(texts, x=list(xs), y=list(ys), ax=ax, expand=(1.2, 1.4), force_text=(0.3, 0.6),
                iter_lim=ADJUST_ITERATIONS,
                arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
    return texts


def annotate_speedups(ax, container, factors: Sequence[float]) -> list:
    """Write ``×N`` (one decimal) on each bar of ``container`` (a bar container of ``ax``), N from ``factors``."""
    if len(container) != len(factors):
        raise ValueError(f"{len(container)} bars but {len(factors)} speed-up factors")
    return ax.bar_label(container, labels=[f"×{f:.1f}" for f in factors], padding=2, fontsize=7)


def mask_legend(ax, colours: Mapping[str, str], **kwargs: Any):
    """A legend of line handles for contour overlays: ``{"ground truth": "lime", ...}``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, lw=1.5, label=label) for label, colour in colours.items()]
    return ax.legend(handles=handles, **{"fontsize": 7, "loc": "lower right", "framealpha": 0.8, **kwargs})


# ------------------------------------------------------------------------------------------ from the records
def regenerate(papers: Sequence[str] | None = None, profile: str = "cpu", root: Path | None = None,
               papers_dir: Path = PAPERS_DIR) -> list[Path]:
    """``mdbench figures``: redraw, from the stored records alone (no retraining), the figures of each paper whose
    experiment module has ``record_figures(store) -> {name: figure}`` (``store``: the paper's
    :class:`~mdbench.results.ResultStore` at ``profile``), into ``<root>/<paper>/<profile>/``
    (default: every paper of ``papers_dir``). Returns the paths written."""
    import importlib

    import matplotlib.pyplot as plt

    from mdbench.paper_yaml import known_papers
    from mdbench.results import ResultStore, results_root

    root = Path(root) if root is not None else results_root()
    written: list[Path] = []
    for paper in papers or known_papers(papers_dir):
        store = ResultStore(paper, profile, root=root)
        records = store.records()
        try:
            module = importlib.import_module(f"mdbench.papers.{paper}.experiment")
        except ModuleNotFoundError as err:
            if not f"mdbench.papers.{paper}.experiment".startswith(err.name or "?"):
                raise  # a package the module needs is missing: say so
            continue  # a paper without an experiment module (the quickstart): its notebook draws its figures
        draw = getattr(module, "record_figures", None)
        if draw is None or not records:
            continue
        for name, fig in draw(store).items():
            try:
                written += store.save_figure(fig, name)
            finally:
                plt.close(fig)
    return written

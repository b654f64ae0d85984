"""The results' CSV tables as rows of cells for the report: numbers as numbers, each with its full value.

A table built from records (:data:`mdbench.results.TABLE_COLUMNS`) is shown by its numeric columns (mean, std,
n, test units, the 95 % interval over seeds, the paper's number and Δ) rather than its formatted ``mean ± std (n=N)`` string;
a claims table (:data:`mdbench.verdicts.COLUMNS`) by its difference, interval, level and adjusted p-value. Other
CSVs (wide views derived from the tables) are not rendered: their numbers are the tables' own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdbench.results import NOT_RUN, TABLE_COLUMNS
from mdbench.verdicts import COLUMNS as CLAIM_COLUMNS
from mdbench.verdicts import FAILS, HOLDS, INCONCLUSIVE

MAX_DECIMALS = 6


@dataclass(frozen=True)
class Cell:
    """One table cell: ``text`` as shown, ``full`` (a number's full precision, for its tooltip), ``numeric``
    (right-aligned, tabular figures)."""

    text: str
    full: str = ""
    numeric: bool = False


@dataclass(frozen=True)
class Table:
    """A table for a page: its ``name`` (the CSV's stem), ``header``, ``rows`` of cells, each row's CSS ``classes``
    (a claim's verdict; empty otherwise) and a ``note`` on what was left out."""

    name: str
    header: list[str]
    rows: list[list[Cell]]
    classes: list[str]
    note: str = ""


def number(value: float) -> Cell:
    """A number to four significant digits (all digits of a large one, with thousands separators, at most
    :data:`MAX_DECIMALS` decimals for a small one), its full value kept; "—" for NaN."""
    if value is None or not math.isfinite(value):
        return Cell("—", numeric=True)
    decimals = min(max(0, 3 - math.floor(math.log10(abs(value)))), MAX_DECIMALS) if value else 0
    return Cell(f"{value:,.{decimals}f}".replace("-", "−"), full=repr(float(value)), numeric=True)


def count(value: float) -> Cell:
    """A whole number (n of seeds or units); "—" for a missing one."""
    return Cell("—", numeric=True) if pd.isna(value) else Cell(f"{int(value):,}", numeric=True)


def text(value) -> Cell:
    """A word cell; "—" for a missing one."""
    return Cell("—" if pd.isna(value) else str(value))


def verdict_class(status: str) -> str:
    """The CSS class of a claim's verdict: holds, fails, inconclusive (also "inconclusive (n=1)") or not-run."""
    if status == HOLDS:
        return "holds"
    if status == FAILS:
        return "fails"
    if status.startswith(INCONCLUSIVE):
        return "inconclusive"
    if status == NOT_RUN:
        return "not-run"
    raise ValueError(f"unknown claim status {status!r}")


def _numeric(series: pd.Series) -> pd.Series:
    """A column of numbers where the CSV has words beside them ("not reported", "—"): the words become NaN."""
    return pd.to_numeric(series, errors="coerce")


def records_table(name: str, df: pd.DataFrame) -> Table:
    """A table built from records (:func:`mdbench.results.build_table`); the paper's number, Δ and the comparison
    are left out when the paper reports none of its numbers."""
    paper, delta = _numeric(df["paper"]), _numeric(df["delta"])
    with_paper = bool(paper.notna().any())
    header = ["dataset", "row", "metric", "mean", "std", "n", "units", "95 % CI low", "95 % CI high"]
    if with_paper:
        header += ["paper", "Δ", "vs paper"]
    header.append("status")
    rows = []
    for i, r in enumerate(df.itertuples(index=False)):
        cells = [text(r.dataset), text(r.row), text(r.metric), number(r.mean), number(r.std), count(r.n),
                 count(r.units), number(r.ci_low), number(r.ci_high)]
        if with_paper:
            cells += [number(paper.iloc[i]), number(delta.iloc[i]), text(r.vs_paper)]
        rows.append([*cells, text(r.status)])
    note = "" if with_paper else "The paper reports none of these numbers."
    return Table(name=name, header=header, rows=rows, classes=[""] * len(rows), note=note)


def claims_table(df: pd.DataFrame) -> Table:
    """A claims table (:func:`mdbench.verdicts.evaluate_claims`), each row classed by its verdict."""
    header = ["claim", "dataset", "lhs", "rhs", "test", "n", "difference", "CI low", "CI high", "level (%)",
              "p (BH-adjusted)", "verdict"]
    rows = [[text(r.text), text(r.dataset), text(r.lhs), text(r.rhs), text(r.test), count(r.n), number(r.difference),
             number(r.ci_low), number(r.ci_high), number(100 * r.confidence), number(r.p_adj), text(r.status)]
            for r in df.itertuples(index=False)]
    return Table(name="claims", header=header, rows=rows, classes=[verdict_class(s) for s in df["status"]],
                 note="difference = lhs − (factor·rhs + offset); its interval is taken at the BH-adjusted level "
                      "(in %).")


def read_table(path: Path) -> Table | None:
    """The table in the CSV at ``path`` for a page, or None for a view that is neither a records table nor a
    claims table."""
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    if list(df.columns) == CLAIM_COLUMNS:
        return claims_table(df)
    if set(TABLE_COLUMNS) <= set(df.columns):
        return records_table(path.stem, df)
    return None

"""Did a rerun reproduce the reference?  Every table cell (record) and claim of two results folders side by side.

A cell agrees when the rerun's mean is within a relative tolerance of the reference's (default 5 %; a paper's
``rerun_tolerance: {table: {relative: r}}`` section in its paper.yaml overrides it per table). Wall-clock
measurements (times in ms, s or min, speed-ups in x, rates per second) depend on the machine and its load: they are
listed but not judged. A claim agrees when both folders give it the same verdict. A cell or claim present on one side only
does not agree.

    mdbench compare results runs/20260102T030405Z-cpu [--paper P] [--profile cpu] [--relative 0.05]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdbench.paper_yaml import PAPERS_DIR, paper_file, read_paper_file
from mdbench.results import Record, load_records
from mdbench.verdicts import WALL_CLOCK_UNITS

DEFAULT_RELATIVE = 0.05
AGREES, DIFFERS, NOT_JUDGED = "agrees", "differs", "not judged (machine-dependent)"
ONLY_REF, ONLY_RUN = "only in reference", "only in run"
MACHINE_UNITS = (*WALL_CLOCK_UNITS, "min", "x")  # the verdicts' wall-clock units, minutes, speed-ups
CELL_COLUMNS = ["paper", "profile", "table", "dataset", "row", "metric", "unit", "reference", "run", "relative_diff",
                "tolerance", "status"]
CLAIM_COLUMNS = ["paper", "profile", "claim", "dataset", "reference", "run", "status"]


class CompareError(ValueError):
    """Bad input: a folder that does not exist or holds no records, a malformed ``rerun_tolerance``."""


def machine_dependent(rec: Record) -> bool:
    """Whether ``rec`` measures wall-clock time, a speed-up (a ratio of times) or a rate per second (units ms, s, min,
    x or ``…/s``; a metric named ``latency…`` or ``…_ms`` whose unit was left empty), which varies with the machine
    and its load."""
    if rec.unit:
        return rec.unit in MACHINE_UNITS or rec.unit.endswith("/s")
    return "latency" in rec.metric or rec.metric.endswith(("_ms", "_s", "_min"))


def rerun_tolerances(paper: str, papers_dir: Path = PAPERS_DIR) -> dict[str, float]:
    """The per-table relative tolerances of ``paper``'s paper.yaml ``rerun_tolerance`` section (none if absent)."""
    path = paper_file(paper, papers_dir)
    section = read_paper_file(path).get("rerun_tolerance") or {}
    entries = section.items() if isinstance(section, dict) else [("rerun_tolerance", section)]
    out = {}
    for table, spec in entries:
        relative = spec.get("relative") if isinstance(spec, dict) else None
        if isinstance(relative, bool) or not isinstance(relative, (int, float)) or not relative >= 0:
            raise CompareError(f"{path}: rerun_tolerance must map tables to {{relative: r}} with r >= 0 (e.g. "
                               f"rerun_tolerance: {{table1: {{relative: 0.1}}}}); got {table}: {spec!r}")
        out[str(table)] = float(relative)
    return out


def agrees(reference: float, run: float, relative: float) -> bool:
    """|run − reference| ≤ relative·|reference| (a reference of 0 needs a run of 0)."""
    return abs(run - reference) <= relative * abs(reference) + 1e-12


def _relative_diff(reference: float, run: float) -> float:
    if reference == 0:
        return 0.0 if run == 0 else math.inf
    return (run - reference) / abs(reference)


def compare_cells(reference: list[Record], run: list[Record], tolerances: dict[str, float],
                  default: float = DEFAULT_RELATIVE) -> pd.DataFrame:
    """One line per record key (table, dataset, row, metric) of either side (:data:`CELL_COLUMNS` without paper
    and profile): both means, their relative difference, the table's tolerance and the status."""
    ref = {r.key: r for r in reference}
    new = {r.key: r for r in run}
    lines = []
    for key in sorted(ref.keys() | new.keys()):
        a, b = ref.get(key), new.get(key)
        tolerance = tolerances.get(key[0], default)
        any_rec = a or b
        assert any_rec is not None
        line = dict(zip(("table", "dataset", "row", "metric"), key, strict=True), unit=any_rec.unit,
                    reference=a.mean if a else math.nan, run=b.mean if b else math.nan, relative_diff=math.nan,
                    tolerance=tolerance)
        if a is None or b is None:
            line["status"] = ONLY_RUN if a is None else ONLY_REF
        else:
            line["relative_diff"] = _relative_diff(a.mean, b.mean)
            if machine_dependent(a) or machine_dependent(b):
                line["status"] = NOT_JUDGED
            else:
                line["status"] = AGREES if agrees(a.mean, b.mean, tolerance) else DIFFERS
        lines.append(line)
    return pd.DataFrame(lines, columns=CELL_COLUMNS[2:])


def _claims(folder: Path) -> pd.DataFrame:
    path = folder / "claims.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["claim", "dataset", "status"])
    return frame[["claim", "dataset", "status"]].astype(str)


def compare_claims(reference: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """The verdicts of each claim (``claim``, ``dataset``, ``status`` columns of a claims.csv) on both sides:
    agrees when they are the same verdict."""
    both = reference.merge(run, on=["claim", "dataset"], how="outer", suffixes=("_ref", "_run"))
    status = [ONLY_RUN if pd.isna(a) else ONLY_REF if pd.isna(b) else AGREES if a == b else DIFFERS
              for a, b in zip(both["status_ref"], both["status_run"], strict=True)]
    return pd.DataFrame({"claim": both["claim"], "dataset": both["dataset"], "reference": both["status_ref"],
                         "run": both["status_run"], "status": status}, columns=CLAIM_COLUMNS[2:])


@dataclass
class Comparison:
    """Every cell and claim compared (:data:`CELL_COLUMNS`, :data:`CLAIM_COLUMNS`)."""

    cells: pd.DataFrame
    claims: pd.DataFrame

    @property
    def all_agree(self) -> bool:
        """Every judged cell and every claim agrees (machine-dependent cells are not judged)."""
        return bool(self.cells["status"].isin([AGREES, NOT_JUDGED]).all() and (self.claims["status"] == AGREES).all())

    def text(self) -> str:
        """Per paper and profile: the counts per table and for the claims, then every cell and claim that does not
        agree and every cell not judged."""
        lines = []
        for (paper, profile), cells in self.cells.groupby(["paper", "profile"], sort=True):
            claims = self.claims[(self.claims["paper"] == paper) & (self.claims["profile"] == profile)]
            lines.append(f"== {paper} ({profile})")
            for table, group in cells.groupby("table", sort=True):
                lines.append(f"  table {table}: {_counts(group['status'])} "
                             f"(tolerance {100 * group['tolerance'].iloc[0]:g} % relative)")
            lines.append(f"  claims: {_counts(claims['status'])}" if len(claims) else "  claims: none judged")
            shown = cells[cells["status"] != AGREES]
            if len(shown):
                lines.append(_indent(shown.drop(columns=["paper", "profile"]).to_string(index=False)))
            differ = claims[claims["status"] != AGREES]
            if len(differ):
                lines.append(_indent(differ.drop(columns=["paper", "profile"]).to_string(index=False)))
        judged = self.cells["status"] != NOT_JUDGED
        statuses = pd.concat([self.cells["status"], self.claims["status"]])
        unmatched = _counts(statuses[~statuses.isin([AGREES, NOT_JUDGED])])  # differ, only in one of the two
        lines.append(f"\n{'all agree' if self.all_agree else unmatched}: {judged.sum()} cells judged, "
                     f"{(~judged).sum()} not judged (machine-dependent), {len(self.claims)} claims")
        return "\n".join(lines)


def _counts(status: pd.Series) -> str:
    """``2 agree, 1 differ, ...``: how many lines have each status."""
    verbs = {AGREES: "agree", DIFFERS: "differ"}
    return ", ".join(f"{n} {verbs.get(s, s)}" for s, n in status.value_counts().sort_index().items())


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _profiles(root: Path, paper: str) -> set[str]:
    return {p.parent.name for p in (root / paper).glob("*/records") if p.is_dir()}


def compare(reference: Path, run: Path, papers: list[str] | None = None, profiles: list[str] | None = None,
            relative: float = DEFAULT_RELATIVE, papers_dir: Path = PAPERS_DIR) -> Comparison:
    """Compare the results folder ``run`` with ``reference`` (both laid out as ``<paper>/<profile>/records``) for
    ``papers`` at ``profiles`` (default: every paper and profile ``run`` holds records of). ``relative``: the
    tolerance of tables that the paper's ``rerun_tolerance`` does not name. Raises :class:`CompareError` for a
    missing folder or a selection with no records in ``run``;
    :class:`~mdbench.paper_yaml.PaperFileError` for an unknown paper."""
    if not relative >= 0:
        raise CompareError(f"--relative must be >= 0, got {relative}")
    for name, folder in (("reference", reference), ("run", run)):
        if not Path(folder).is_dir():
            raise CompareError(f"the {name} folder {folder} does not exist or is not a folder")
    reference, run = Path(reference), Path(run)
    for paper in papers or ():
        paper_file(paper, papers_dir)
    chosen = papers or sorted(p.name for p in run.iterdir() if _profiles(run, p.name))
    cells, claims = [], []
    for paper in chosen:
        tolerances = rerun_tolerances(paper, papers_dir)
        for profile in sorted(set(profiles) if profiles else _profiles(run, paper)):
            new = load_records(run / paper / profile / "records")
            if not new:
                continue
            ref = load_records(reference / paper / profile / "records")
            cells.append(compare_cells(ref, new, tolerances, relative).assign(paper=paper, profile=profile))
            claims.append(compare_claims(_claims(reference / paper / profile), _claims(run / paper / profile))
                          .assign(paper=paper, profile=profile))
    if not cells:
        wanted = f"papers {', '.join(chosen)}" if papers else "any paper"
        raise CompareError(f"no records of {wanted}{f' at profile(s) {profiles}' if profiles else ''} under {run} "
                           "(expected <paper>/<profile>/records/*.json)")
    return Comparison(cells=pd.concat(cells, ignore_index=True)[CELL_COLUMNS],
                      claims=pd.concat(claims, ignore_index=True)[CLAIM_COLUMNS])


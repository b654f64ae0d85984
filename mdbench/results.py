"""The results contract: one record per measured number, paper references and claims, tables built from records.

Layout on disk (``root`` is ``results/`` unless ``MDBENCH_RESULTS_DIR`` says otherwise)::

    <root>/<paper>/<profile>/records/<table>__<dataset>__<row>__<metric>.json   one per measured number
    <root>/<paper>/<profile>/records/<table>__<dataset>__<row>.samples.csv.gz  per-sample outputs of a row
    <root>/<paper>/<profile>/<name>.csv|.md|.svg|.png                          tables and figures

Profiles get their own folder so that a smoke run (CI, nbval) never overwrites the numbers of a cpu or gpu run.
Every file is written atomically (:func:`mdbench.io.atomic_write`), so an interrupted run leaves either the old file
or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdbench import figures
from mdbench import samples as sample_outputs
from mdbench.io import atomic_write
from mdbench.paper_yaml import PaperFileError, paper_file, read_paper_file
from mdbench.repro import config_hash, fingerprint

NOT_REPORTED = "not reported"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class RecordError(ValueError):
    """A record file that cannot be read or a record that breaks the contract."""


class PaperReferenceError(PaperFileError):
    """A paper's reported numbers or claims that break the contract (a guessed value, an unknown operator)."""


def results_root() -> Path:
    """``MDBENCH_RESULTS_DIR`` if set, else ``results/`` at the repository root."""
    return Path(os.environ.get("MDBENCH_RESULTS_DIR", _REPO_ROOT / "results"))


# --------------------------------------------------------------------------------------------------- records
@dataclass
class Record:
    """One measured number: a metric of one row of one paper table, over one or more seeds."""

    paper: str
    table: str
    row: str
    metric: str
    values: list[float]
    seeds: list[int]
    dataset: str
    dataset_checksum: str
    profile: str
    config: dict[str, Any]
    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    config_hash: str = ""
    unit: str = ""
    notes: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    time: str = ""
    samples: dict[str, Any] | None = None  # a SamplesRef: the per-sample outputs each value aggregates

    def __post_init__(self) -> None:
        for name in ("paper", "table", "row", "metric", "dataset", "profile"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise RecordError(f"record field {name!r} must be a non-empty string, got {getattr(self, name)!r}")
        self.values = [float(v) for v in self.values]
        if not self.values:
            raise RecordError(f"record {self.key} has no values")
        if not all(math.isfinite(v) for v in self.values):
            raise RecordError(f"record {self.key} has a non-finite value: {self.values}")
        self.seeds = [int(s) for s in self.seeds]
        if len(self.seeds) != len(self.values):
            raise RecordError(f"record {self.key}: {len(self.values)} values but {len(self.seeds)} seeds")
        arr = np.asarray(self.values)
        self.n = len(arr)
        self.mean = float(arr.mean())
        self.std = float(arr.std(ddof=1)) if self.n > 1 else 0.0
        self.config_hash = self.config_hash or config_hash(self.config)
        try:
            sample_outputs.SamplesRef.from_dict(self.samples)
        except (KeyError, TypeError, ValueError) as err:
            raise RecordError(f"record {self.key}: bad per-sample pointer {self.samples!r}: {err}") from err

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.table, self.dataset, self.row, self.metric)

    @property
    def samples_ref(self) -> sample_outputs.SamplesRef | None:
        return sample_outputs.SamplesRef.from_dict(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = {f for f in cls.__dataclass_fields__}
        missing = {"paper", "table", "row", "metric", "values", "seeds", "dataset", "dataset_checksum",
                   "profile", "config"} - set(data)
        if missing:
            raise RecordError(f"record is missing fields {sorted(missing)}")
        stored = {k: data[k] for k in ("mean", "std", "n")}
        record = cls(**{k: v for k, v in data.items() if k in known})
        if stored["n"] != record.n or not math.isclose(stored["mean"], record.mean, rel_tol=1e-9, abs_tol=1e-12):
            raise RecordError(f"record {record.key}: stored mean/n disagree with its values")
        return record


def slug(text: str) -> str:
    """``text`` as a file-name part: every run of other characters than letters, digits, ``.``, ``+`` and ``-`` becomes
    ``_``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


class ResultStore:
    """Records, tables and figures of one paper at one profile, under ``<root>/<paper>/<profile>/``."""

    def __init__(self, paper: str, profile: str, root: Path | None = None) -> None:
        self.paper = paper
        self.profile = profile
        self.dir = Path(root or results_root()) / paper / profile
        self.records_dir = self.dir / "records"
        self._fingerprint: dict[str, Any] | None = None

    def record_path(self, table: str, dataset: str, row: str, metric: str) -> Path:
        return self.records_dir / f"{slug(table)}__{slug(dataset)}__{slug(row)}__{slug(metric)}.json"

    def samples_path(self, table: str, dataset: str, row: str) -> Path:
        return self.records_dir / f"{slug(table)}__{slug(dataset)}__{slug(row)}{sample_outputs.SUFFIX}"

    def write_samples(self, table: str, dataset: str, row: str, frame: pd.DataFrame) -> str:
        """Write a row's per-sample outputs (:mod:`mdbench.samples`) atomically; returns the file name that
        records point to."""
        frame = sample_outputs.validate(frame.reset_index(drop=True))
        path = atomic_write(self.samples_path(table, dataset, row), sample_outputs.to_bytes(frame))
        return path.name

    def samples(self, rec: Record) -> pd.DataFrame | None:
        """The per-sample outputs behind ``rec``, or None where it has none."""
        ref = rec.samples_ref
        return None if ref is None else sample_outputs.read(self.records_dir / ref.file)

    def record(self, table: str, row: str, metric: str, values: float | Sequence[float], *, dataset: str,
               dataset_checksum: str, config: dict[str, Any], seeds: Sequence[int] | None = None,
               unit: str = "", notes: str = "", samples: sample_outputs.SamplesRef | None = None,
               sample_lines: pd.DataFrame | None = None) -> Record:
        """Make a record of a measured number and write it atomically; returns the record.

        ``samples`` points to the per-sample outputs (written first by :meth:`write_samples`) the values were
        aggregated from; they must give back every seed's value, else :class:`~mdbench.samples.SamplesError`.
        ``sample_lines``: that file as read back (:func:`mdbench.samples.read`) where the caller has it (one read
        for all metrics of a row); else it is read here.
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint()
        values = list(values) if isinstance(values, (Sequence, np.ndarray)) else [values]
        seeds = list(seeds) if seeds is not None else list(range(len(values)))
        if samples is not None:
            if sample_lines is None:
                sample_lines = sample_outputs.read(self.records_dir / samples.file)
            sample_outputs.check_reproduces(sample_lines, samples, metric, seeds, values)
        rec = Record(paper=self.paper, table=table, row=row, metric=metric, values=values, seeds=seeds,
                     dataset=dataset, dataset_checksum=dataset_checksum, profile=self.profile,
                     config=config, unit=unit, notes=notes, fingerprint=self._fingerprint,
                     time=datetime.now(UTC).isoformat(timespec="seconds"),
                     samples=None if samples is None else samples.as_dict())
        text = json.dumps(rec.as_dict(), indent=1, sort_keys=True, default=str)
        atomic_write(self.record_path(table, dataset, row, metric), text + "\n")
        return rec

    def get(self, table: str, row: str, metric: str, *, dataset: str, config: dict[str, Any] | None = None):
        """The stored record, or None; with ``config``, only if it was made with that config (for resuming)."""
        path = self.record_path(table, dataset, row, metric)
        if not path.exists():
            return None
        rec = load_record(path)
        if config is not None and rec.config_hash != config_hash(config):
            return None
        return rec

    def records(self) -> list[Record]:
        return load_records(self.records_dir)

    def save_table(self, df: pd.DataFrame, name: str, markdown: pd.DataFrame | None = None,
                   note: str = "") -> tuple[Path, Path]:
        """Write a table as ``<name>.csv`` and ``<name>.md``; multi-level column names are joined with spaces.
        The Markdown view is ``markdown`` where given, else ``df`` without the numeric twins (``mean``, ``std``,
        ``ci_low``, ``ci_high``) of a formatted column, which the CSV keeps for sorting and plotting; ``note``
        goes under it (e.g. :func:`protocol_note`)."""
        df = flatten_columns(df)
        csv = atomic_write(self.dir / f"{name}.csv", df.to_csv(index=False))
        if markdown is None:
            markdown = df.drop(columns=[c for c in NUMERIC_TWINS if c in df.columns]) if "reproduced" in df else df
        text = to_markdown(flatten_columns(markdown)) + "\n" + (f"\n{note}\n" if note else "")
        md = atomic_write(self.dir / f"{name}.md", text)
        return csv, md

    def save_figure(self, fig, name: str) -> list[Path]:
        """Write ``fig`` as ``<name>.svg`` and a 300-dpi ``<name>.png`` (:func:`mdbench.figures.save`)."""
        return figures.save(fig, self.dir / name)


def flatten_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each multi-level column name such as ``("dsc", "MR")`` joined to ``"dsc MR"`` (empty levels dropped),
    so CSV and Markdown headers read as words rather than tuples."""
    if not isinstance(df.columns, pd.MultiIndex):
        return df
    flat = df.copy()
    flat.columns = [" ".join(str(level) for level in column if str(level)) for column in df.columns]
    return flat


def load_record(path: Path) -> Record:
    """The record in the JSON file ``path``; a file that is not one is an error saying how to remake it."""
    try:
        data = json.loads(Path(path).read_text())
        return Record.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise RecordError(f"corrupt record file {path}: {err}. Delete it and rerun the notebook to remake it.") from err
    except RecordError as err:
        raise RecordError(f"corrupt record file {path}: {err}") from err


def load_records(folder: Path) -> list[Record]:
    """Every record in ``folder``; the ``.tmp-*`` files of a write that was cut off are not records."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [load_record(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------------------ paper references
@dataclass(frozen=True)
class Side:
    """One side of a claim: a row's metric in the claim's table. ``seedless``: a row no seed trains (a pretrained
    model scored as it is, DAFT's LiteMedSAM baseline), whose one run then pairs with every seed of the other side."""

    row: str
    metric: str
    seedless: bool = False


@dataclass(frozen=True)
class Claim:
    """``lhs  op  factor × rhs + offset``, judged on the paired difference of two records
    (:mod:`mdbench.verdicts`).

    "row A's AUC exceeds row B's": lhs=A/auc, op='>', rhs=B/auc. "the student's FLOPs are at most a quarter of the
    teacher's": lhs=student/flops, op='<=', factor=0.25, rhs=teacher/flops. "A matches or beats B within 1 point":
    op='>=', offset=-1. ``exact``: a deterministic quantity (parameter count, FLOPs), compared as it is;
    ``test="spread"``: a claim about spread across seeds (absolute deviations), judged by Levene's test.
    """

    id: str
    text: str
    table: str
    lhs: Side
    op: str
    rhs: Side
    factor: float = 1.0
    offset: float = 0.0
    dataset: str | None = None
    exact: bool = False
    test: str = "paired"


CLAIM_TESTS = ("paired", "spread")
CLAIM_OPS = (">", ">=", "<", "<=")


DEFAULT_DIGITS = 2


@dataclass
class PaperReference:
    """A paper's reported numbers (``reported[table][row][metric]``: a number or "not reported") and its claims."""

    paper: str
    title: str
    citation: str
    reported: dict[str, dict[str, dict[str, Any]]]
    claims: list[Claim]
    tolerance: dict[str, float]
    lower_is_better: frozenset[str] = frozenset()
    comparable: dict[str, list[str]] = field(default_factory=dict)
    digits: dict[str, int] = field(default_factory=dict)  # decimals of a table's numbers where not the default

    @property
    def tables(self) -> dict[str, int]:
        """The paper's tables (those its ``reported`` numbers name) with the decimals each is shown with (2 unless
        the paper.yaml's ``digits`` says otherwise)."""
        return {table: self.digits.get(table, DEFAULT_DIGITS) for table in self.reported}

    def value(self, table: str, row: str, metric: str):
        value = self.reported.get(table, {}).get(row, {}).get(metric, NOT_REPORTED)
        return value if isinstance(value, (int, float)) else NOT_REPORTED


def load_reference(paper: str, path: Path | None = None) -> PaperReference:
    """The reported numbers and claims of ``mdbench/papers/<paper>/paper.yaml`` (or of the file at ``path``)."""
    path = Path(path) if path else paper_file(paper)
    data = read_paper_file(path)
    try:
        claims = []
        for c in data.get("claims", []):
            if c["op"] not in CLAIM_OPS:
                raise PaperReferenceError(f"claim {c['id']}: unknown op {c['op']!r}; use one of {list(CLAIM_OPS)}")
            if c.get("test", "paired") not in CLAIM_TESTS:
                raise PaperReferenceError(f"claim {c['id']}: unknown test {c['test']!r}; use one of {list(CLAIM_TESTS)}")
            claims.append(Claim(id=c["id"], text=c["text"], table=c["table"], lhs=Side(**c["lhs"]), op=c["op"],
                                rhs=Side(**c["rhs"]), factor=float(c.get("factor", 1.0)),
                                offset=float(c.get("offset", 0.0)), dataset=c.get("dataset"),
                                exact=bool(c.get("exact", False)), test=c.get("test", "paired")))
        for table, rows in (data.get("reported") or {}).items():
            for row, metrics in rows.items():
                for metric, value in metrics.items():
                    if not isinstance(value, (int, float)) and value != NOT_REPORTED:
                        raise PaperReferenceError(f"{table}/{row}/{metric}: {value!r} is neither a number nor "
                                                  f"{NOT_REPORTED!r}")
        digits = data.get("digits") or {}
        unknown = set(digits) - set(data.get("reported") or {})
        if unknown or not all(type(d) is int and d >= 0 for d in digits.values()):
            raise PaperReferenceError(f"digits must map tables of reported ({sorted(data.get('reported') or {})}) "
                                      f"to decimals (whole numbers >= 0); got {digits!r}")
        return PaperReference(paper=data.get("paper", paper), title=data.get("title", ""),
                              citation=data.get("citation", ""), reported=data.get("reported") or {},
                              claims=claims, tolerance=data.get("tolerance") or {},
                              lower_is_better=frozenset(data.get("lower_is_better") or ()),
                              comparable={t: list(rows) for t, rows in (data.get("comparable") or {}).items()},
                              digits=dict(digits))
    except (KeyError, TypeError) as err:
        raise PaperReferenceError(f"malformed paper reference {path}: {err!r}") from err


NOT_RUN = "not run"


# -------------------------------------------------------------------------------------------------- tables
def format_value(rec: Record | None, digits: int = 2) -> str:
    """A record for a table: ``mean ± std (n=N)``, ``mean (n=1)`` for one seed, "not run" for none."""
    if rec is None:
        return NOT_RUN
    if rec.n == 1:
        return f"{rec.mean:.{digits}f} (n=1)"
    return f"{rec.mean:.{digits}f} ± {rec.std:.{digits}f} (n={rec.n})"


NUMERIC_TWINS = ("mean", "std", "ci_low", "ci_high")  # of "reproduced", in build_table's CSV only
SYNTHETIC = "n/a (synthetic)"
NO_PAPER_VALUE = "no paper value"
COMPARABLE = "comparable"
NOT_COMPARABLE = "not comparable (different data)"
TABLE_COLUMNS = ["dataset", "row", "metric", "paper", "reproduced", "delta", "vs_paper", "status", "mean", "std", "n",
                 "units", "ci_low", "ci_high"]


def compare_with_paper(reference: PaperReference, table: str, rec: Record, paper: float) -> tuple[str, str]:
    """(status, vs_paper) of a reproduced number beside the paper's.

    status: "n/a (synthetic)" at the smoke profile, "comparable" for rows the paper.yaml lists as run on the
    paper's data and protocol, else "not comparable (different data)". vs_paper: "within tolerance" when
    |Δ| ≤ the table's tolerance, else "better" or "worse" (lower is better for the paper's ``lower_is_better``
    metrics).
    """
    status = SYNTHETIC if rec.profile == "smoke" else (
        COMPARABLE if rec.row in reference.comparable.get(table, ()) else NOT_COMPARABLE)
    delta = rec.mean - paper
    tolerance = reference.tolerance.get(table)
    if tolerance is not None and abs(delta) <= tolerance:
        return status, "within tolerance"
    better = delta < 0 if rec.metric in reference.lower_is_better else delta > 0
    return status, "better" if better else "worse"


def build_table(reference: PaperReference, records: Iterable[Record], table: str, digits: int = DEFAULT_DIGITS,
                include_not_run: bool = False, samples_of: Callable[[Record], pd.DataFrame | None] | None = None
                ) -> pd.DataFrame:
    """One line per (dataset, row, metric) we measured (:data:`TABLE_COLUMNS`): the paper's number, ours as
    ``mean ± std (n=N)`` and as numbers (``mean``, ``std``, ``n`` seeds, ``ci_low``/``ci_high``: 95 % t-interval
    over seeds, :func:`mdbench.metrics.mean_std_ci`), Δ, and how the two compare (:func:`compare_with_paper`; "no
    paper value" where the paper gives none). ``units``: how many distinct per-sample units (test cases, images,
    bags, timing repeats) the row rests on, from its per-sample outputs (``samples_of``, e.g.
    :meth:`ResultStore.samples`); empty where it has none. ``include_not_run`` adds the paper's rows we have no
    record for, marked "not run".
    """
    from mdbench.metrics import mean_std_ci  # torch and MONAI come with it: only where a table is built

    recs = [r for r in records if r.table == table]
    reported = reference.reported.get(table, {})
    keys = {(r.dataset, r.row, r.metric) for r in recs}
    if include_not_run:
        datasets = sorted({r.dataset for r in recs}) or ["—"]
        keys |= {(dataset, row, metric) for row, metrics in reported.items() for metric in metrics
                 for dataset in datasets}
    by_key = {(r.dataset, r.row, r.metric): r for r in recs}
    row_order = {row: i for i, row in enumerate(reported)}
    files: dict[str, pd.DataFrame | None] = {}  # a row's metrics share one file: read it once

    def units(rec: Record) -> int | str:
        ref = rec.samples_ref
        if ref is None or samples_of is None:
            return ""
        if ref.file not in files:
            files[ref.file] = samples_of(rec)
        frame = files[ref.file]
        return "" if frame is None else sample_outputs.count_units(frame, ref, rec.metric, rec.seeds)

    out = []
    for dataset, row, metric in sorted(keys, key=lambda k: (k[0], row_order.get(k[1], len(row_order)), k[1], k[2])):
        rec = by_key.get((dataset, row, metric))
        paper = reference.value(table, row, metric)
        line = {"dataset": dataset, "row": row, "metric": metric,
                "paper": paper if paper == NOT_REPORTED else f"{paper:.{digits}f}",
                "reproduced": format_value(rec, digits), "delta": "—", "vs_paper": "—",
                "mean": math.nan, "std": math.nan, "n": 0, "units": "", "ci_low": math.nan, "ci_high": math.nan}
        if rec is None:
            line["status"] = NOT_RUN
        else:
            summary = mean_std_ci(rec.values)
            line.update(mean=rec.mean, std=rec.std, n=rec.n, units=units(rec), ci_low=summary["ci_low"],
                        ci_high=summary["ci_high"])
            if paper == NOT_REPORTED:
                line["status"] = SYNTHETIC if rec.profile == "smoke" else NO_PAPER_VALUE
            else:
                line["status"], line["vs_paper"] = compare_with_paper(reference, table, rec, paper)
                line["delta"] = f"{rec.mean - paper:+.{digits}f}"
        out.append(line)
    return pd.DataFrame(out, columns=TABLE_COLUMNS)


def protocol_note(records: Iterable[Record], table: str) -> str:
    """What the records of ``table`` say about how it was measured, for a line under the table: the seeds, and
    the k of a k-fold cross-validation where their configs have ``folds``; empty for no records."""
    recs = [r for r in records if r.table == table]
    if not recs:
        return ""
    seeds = sorted({s for r in recs for s in r.seeds})
    parts = [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"]
    folds = sorted({str(r.config["folds"]) for r in recs if "folds" in r.config})
    if folds:
        parts.insert(0, f"{' or '.join(folds)}-fold cross-validation")
    return ("Protocol (from the records): " + "; ".join(parts)
            + ". n: seeds behind a row; units: its test cases, images, bags or timing repeats.")


def save_tables(store: ResultStore) -> dict[str, pd.DataFrame]:
    """Build every table of ``store``'s paper (:attr:`PaperReference.tables`) from the records and per-sample
    outputs on disk, save each that has records (CSV, and Markdown with its :func:`protocol_note`; a table the
    profile does not measure, like DAFT's CPU Table B at gpu, leaves no empty file) and return them all by name."""
    reference = load_reference(store.paper)
    records = store.records()
    recorded = {record.table for record in records}
    built = {}
    for name, digits in reference.tables.items():
        built[name] = build_table(reference, records, name, digits=digits, samples_of=store.samples)
        if name in recorded:
            store.save_table(built[name], name, note=protocol_note(records, name))
    return built


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own ``to_markdown`` needs the extra ``tabulate`` package)."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])

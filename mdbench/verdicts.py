"""A paper's claims judged as statistical statements on paired differences.

A claim ``lhs op factor·rhs + offset`` is judged on ``d = lhs − (factor·rhs + offset)``, paired on what the two
rows share, with an interval from SciPy, adjusted over the paper's claims:

- **paired t over units** (:func:`scipy.stats.ttest_1samp`): both rows keep per-unit values whose mean is the
  record (Dice per case, correct per image for accuracy). ``d`` per (seed, unit), averaged over the seeds a unit
  appears in, so that a test case seen under several seeds counts once; n = units.
- **bootstrap over units** (:func:`scipy.stats.bootstrap`, percentile): both rows keep outputs whose aggregate is
  not a plain mean (AUC of classifier outputs; a macro average over modalities, i.e. a weighted mean). Units are
  resampled (with their lines of every seed) and the statistic recomputed; n = units.
- **bootstrap of medians over units** (records whose aggregate is the median of per-unit values: wall-clock times,
  one unit per timed repeat): the repeats both rows share are resampled, each with both rows' times, and the
  difference of the two rows' medians recomputed; n = repeats. It assumes the repeats are exchangeable draws of
  the machine's timing noise during the run, paired by repeat id (repeat r of every row is timed in one round,
  :func:`mdbench.efficiency.measure_latencies`, so that a load change hits both sides of a pair); its interval is
  about this machine and this run, not another machine or load (claims on them are marked,
  :data:`WALL_CLOCK_NOTE`), and with few repeats (a percentile bootstrap of a median over < 10) it is rough.
- with two seeds or more, either interval is widened by the variance of the per-seed differences
  (:func:`_with_seed_variance`), so that a verdict covers the training seeds as well as the test cases.
- a side marked ``seedless`` (a row no seed trains) has one run, which pairs with each seed of the other side: ``d``
  per unit is then the other row's mean over its seeds minus the seedless row's value, and the seed variance is
  the other row's.
- **paired t over seeds**: no per-unit outputs on one side; ``d`` per shared seed; n = seeds. One seed gives no
  interval: inconclusive (n=1).
- **spread** (claims marked ``test: spread``, about absolute deviations across seeds): Levene's test, i.e. a
  two-sample t-test (:func:`scipy.stats.ttest_ind`) on the absolute deviations; needs at least 3 seeds a side,
  else not decidable at that profile.
- **exact** (claims marked ``exact: true``: parameter counts, FLOPs): the means compared as they are.

Multiplicity: the p-values of a paper's statistical claims are adjusted with Benjamini–Hochberg
(:func:`scipy.stats.false_discovery_control`); each interval is then taken at the false-coverage-adjusted level
``1 − R·α/m`` (Benjamini & Yekutieli 2005; R claims decided of m, R ≥ 1), at which the BH-selected intervals
exclude zero. The verdict follows that interval: *holds* if it lies on the claimed side of zero, *does not hold*
if it lies on the other, *inconclusive* otherwise.

Written here rather than taken from a library: the pairing of records' per-sample outputs and the vectorised AUC
of resampled units (no maintained package does either); the tests themselves are SciPy's.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mdbench import results
from mdbench import samples as sample_outputs
from mdbench.io import atomic_write
from mdbench.results import NOT_RUN, Claim, PaperReference, Record, ResultStore, Side, format_value

ALPHA = 0.05
N_RESAMPLES = 4999
MIN_SPREAD_SEEDS = 3
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
COLUMNS = ["claim", "text", "dataset", "lhs", "rhs", "test", "n", "difference", "ci_low", "ci_high", "confidence", "p",
           "p_adj", "status"]

# claims judged on these units compare wall-clock times, which depend on the machine and its load
WALL_CLOCK_UNITS = ("s", "ms")
WALL_CLOCK_NOTE = "(wall-clock, varies by machine)"

SamplesOf = Callable[[Record], pd.DataFrame | None]


@dataclass
class Evidence:
    """The paired difference behind one claim check: its test, n, mean difference and two-sided p-value
    (nan where the test gives none); ``interval(confidence)`` is its interval at any level."""

    test: str
    n: int
    diff: float
    p: float = math.nan
    interval: Callable[[float], tuple[float, float]] = field(default=lambda confidence: (math.nan, math.nan))
    exact: bool = False
    se: float = math.nan  # standard error of diff, and its degrees of freedom (for adding seed variance)
    df: float = math.nan


# ----------------------------------------------------------------------------------------------------- tests
def _interval_of(result) -> Callable[[float], tuple[float, float]]:
    """The interval at any confidence of a SciPy t-test result (``ttest_1samp``, ``ttest_ind``)."""
    def interval(confidence: float) -> tuple[float, float]:
        ci = result.confidence_interval(confidence)
        return float(ci.low), float(ci.high)

    return interval


def _t_evidence(d: np.ndarray, test: str) -> Evidence:
    """Paired t on differences ``d`` (one per unit or seed)."""
    n = len(d)
    mean = float(np.mean(d))
    if n < 2:
        return Evidence(test, n, mean)
    if np.ptp(d) == 0:  # no spread: the interval is the point itself, and it is decided unless it is zero
        return Evidence(test, n, mean, 1.0 if mean == 0 else 0.0, lambda confidence: (mean, mean))
    result = stats.ttest_1samp(d, 0.0)
    return Evidence(test, n, mean, float(result.pvalue), _interval_of(result), se=float(np.std(d, ddof=1) / math.sqrt(n)),
                    df=n - 1)


def _bootstrap_evidence(statistic: Callable[[np.ndarray], np.ndarray], n_units: int, test: str) -> Evidence:
    """Percentile bootstrap over ``n_units`` units; ``statistic`` maps (B, n_units) resampled unit indices to
    (B,) differences. The p-value inverts the percentile interval: twice the smaller tail beyond zero."""
    diff = float(statistic(np.arange(n_units)[None, :])[0])
    if n_units < 2:
        return Evidence(test, n_units, diff)
    res = stats.bootstrap((np.arange(n_units),), statistic, n_resamples=N_RESAMPLES, method="percentile",
                          vectorized=True, random_state=np.random.default_rng(0))
    dist = res.bootstrap_distribution
    p = float(min(1.0, 2 * min(np.mean(dist <= 0), np.mean(dist >= 0))))

    def interval(confidence: float) -> tuple[float, float]:
        low, high = np.quantile(dist, [(1 - confidence) / 2, (1 + confidence) / 2])
        return float(low), float(high)

    return Evidence(test, n_units, diff, p, interval, se=float(np.std(dist, ddof=1)), df=n_units - 1)


def _with_seed_variance(ev: Evidence, seed_diffs: np.ndarray) -> Evidence:
    """``ev`` (paired over test units, seeds averaged) widened by the training-seed variance.

    The units' interval covers which test cases were drawn, not which seeds trained the models: a seed whose
    training went astray shifts every case. With S ≥ 2 seeds, the variance of the per-seed differences over S
    is added to the units' squared standard error (Welch–Satterthwaite degrees of freedom), and the interval and
    p-value come from Student's t (:data:`scipy.stats.t`). Written here: no maintained package gives a crossed
    (case × seed) interval for records like these without a mixed-model fit.
    """
    n_seeds = len(seed_diffs)
    if n_seeds < 2 or math.isnan(ev.se):
        return ev
    unit_var, seed_var = ev.se ** 2, float(np.var(seed_diffs, ddof=1)) / n_seeds
    se = math.sqrt(unit_var + seed_var)
    if se == 0:
        return ev
    df = (unit_var + seed_var) ** 2 / (unit_var ** 2 / ev.df + seed_var ** 2 / (n_seeds - 1))
    dist = stats.t(df, loc=ev.diff, scale=se)

    def interval(confidence: float) -> tuple[float, float]:
        low, high = dist.interval(confidence)
        return float(low), float(high)

    p = float(2 * stats.t.sf(abs(ev.diff) / se, df))
    # the degrees of freedom say what n does not: with the seeds' spread dominant they near n_seeds - 1
    return Evidence(f"{ev.test} and {n_seeds} seeds (t with {df:.1f} df)", ev.n, ev.diff, p, interval, se=se, df=df)


def _unit_counts(idx: np.ndarray, n_units: int) -> np.ndarray:
    """(B, n) resampled unit indices -> (B, n_units) how often each unit was drawn."""
    counts = np.zeros((idx.shape[0], n_units))
    np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return counts


def _weighted_auc(counts: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUC (binary; one-vs-rest macro for C > 2, as :func:`mdbench.metrics.classification_metrics`) of outputs
    whose units are counted ``counts`` (B, N) times: the Mann–Whitney form with ties counting one half."""
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    aucs = []
    for k in classes:
        pos, neg = labels == k, labels != k
        s = probs[:, k]
        wins = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        cp, cn = counts[:, pos], counts[:, neg]
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.einsum("bi,ij,bj->b", cp, wins, cn) / (cp.sum(1) * cn.sum(1)))
    return 100 * np.mean(aucs, axis=0)


# ------------------------------------------------------------------------------------------ pairing records
def _per_unit(frame: pd.DataFrame, rec: Record) -> pd.DataFrame:
    """``seed, unit, value, weight`` of a record whose aggregate is a per-unit mean or median (accuracy
    included: correct or not per unit)."""
    ref = rec.samples_ref
    assert ref is not None
    if ref.aggregate in sample_outputs.PER_UNIT:
        own = frame[frame["metric"] == rec.metric]
        weight = own["weight"] if "weight" in own else 1.0
        return pd.DataFrame({"seed": own["seed"], "unit": own["unit"], "value": own["value"] * ref.scale,
                             "weight": weight})
    probs = frame[sample_outputs.prob_columns(frame)].to_numpy()
    correct = (probs.argmax(axis=1) == frame["label"].to_numpy()).astype(float)
    return pd.DataFrame({"seed": frame["seed"], "unit": frame["unit"], "value": correct * ref.scale, "weight": 1.0})


def _paired_mean(claim: Claim, lhs: pd.DataFrame, rhs: pd.DataFrame) -> Evidence | None:
    """Two rows' (weighted) per-unit means paired on (seed, unit): a t-test over units where both rows score the
    same units with equal weights, else a bootstrap over units in which each row keeps its own units and weights
    (a case one row failed to score, a modality one row lacks)."""
    both = lhs.merge(rhs, on=["seed", "unit"], how="outer", suffixes=("_l", "_r"))
    if both.empty or both["value_l"].isna().all() or both["value_r"].isna().all():
        return None
    units = pd.Index(both["unit"].unique())
    complete = both[["value_l", "value_r"]].notna().all().all()
    if complete and both[["weight_l", "weight_r"]].stack().nunique() == 1:
        both["d"] = both["value_l"] - (claim.factor * both["value_r"] + claim.offset)
        return _t_evidence(both.groupby("unit", sort=False)["d"].mean().to_numpy(), f"paired t over {len(units)} units")
    seeds = sorted(both["seed"].unique())
    rows, cols = both["seed"].map({s: i for i, s in enumerate(seeds)}).to_numpy(), units.get_indexer(both["unit"])
    # (seeds, units) weights and weighted values of each row; a unit a row did not score weighs 0 there
    sides = []
    for side in ("l", "r"):
        w, wv = np.zeros((len(seeds), len(units))), np.zeros((len(seeds), len(units)))
        scored = both[f"value_{side}"].notna().to_numpy()
        w[rows[scored], cols[scored]] = both[f"weight_{side}"][scored]
        wv[rows[scored], cols[scored]] = (both[f"weight_{side}"] * both[f"value_{side}"])[scored]
        sides.append((w, wv))

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        counts = _unit_counts(idx, len(units))
        with np.errstate(invalid="ignore", divide="ignore"):
            (wl, vl), (wr, vr) = sides
            per_seed = (counts @ vl.T) / (counts @ wl.T) - (claim.factor * (counts @ vr.T) / (counts @ wr.T)
                                                           + claim.offset)
            return np.nanmean(per_seed, axis=1)

    return _bootstrap_evidence(statistic, len(units), f"bootstrap over {len(units)} units")


def _paired_median(claim: Claim, lhs: pd.DataFrame, rhs: pd.DataFrame) -> Evidence | None:
    """Two rows' per-unit medians (``seed, unit, value`` of :func:`_per_unit`) paired on (seed, unit): a bootstrap
    over the units both rows have of ``median(lhs) − (factor·median(rhs) + offset)``, averaged over seeds."""
    both = lhs.merge(rhs, on=["seed", "unit"], suffixes=("_l", "_r"))
    if both.empty:
        return None
    seeds, units = sorted(both["seed"].unique()), pd.Index(both["unit"].unique())
    rows, cols = both["seed"].map({s: i for i, s in enumerate(seeds)}).to_numpy(), units.get_indexer(both["unit"])
    # (seeds, units) values of each row; a unit a seed lacks is nan and left out of that seed's median
    values = {}
    for side in ("l", "r"):
        values[side] = np.full((len(seeds), len(units)), np.nan)
        values[side][rows, cols] = both[f"value_{side}"]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        with warnings.catch_warnings():  # a resample that draws none of a seed's units: nan, left out below
            warnings.simplefilter("ignore", RuntimeWarning)
            per_seed = (np.nanmedian(values["l"][:, idx], axis=-1)
                        - (claim.factor * np.nanmedian(values["r"][:, idx], axis=-1) + claim.offset))
            return np.nanmean(per_seed, axis=0)

    return _bootstrap_evidence(statistic, len(units), f"bootstrap of medians over {len(units)} units")


def _paired_auc(claim: Claim, lhs: pd.DataFrame, rhs: pd.DataFrame) -> Evidence | None:
    seeds = sorted(set(lhs["seed"]) & set(rhs["seed"]))
    units = pd.Index(sorted(set(lhs["unit"]) & set(rhs["unit"])))
    parts = []
    for seed in seeds:
        a = lhs[lhs["seed"] == seed].set_index("unit")
        b = rhs[rhs["seed"] == seed].set_index("unit")
        shared = a.index.intersection(b.index)
        if not len(shared) or not a.loc[shared, "label"].equals(b.loc[shared, "label"]):
            continue
        parts.append((units.get_indexer(shared), a.loc[shared, "label"].to_numpy(),
                      a.loc[shared, sample_outputs.prob_columns(a)].to_numpy(),
                      b.loc[shared, sample_outputs.prob_columns(b)].to_numpy()))
    if not parts:
        return None

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        counts = _unit_counts(idx, len(units))
        per_seed = [_weighted_auc(counts[:, cols], labels, pa)
                    - (claim.factor * _weighted_auc(counts[:, cols], labels, pb) + claim.offset)
                    for cols, labels, pa, pb in parts]
        return np.nanmean(per_seed, axis=0)

    return _bootstrap_evidence(statistic, len(units), f"bootstrap over {len(units)} units")


def _paired_samples(claim: Claim, lhs: Record, rhs: Record, samples_of: SamplesOf) -> Evidence | None:
    """Evidence from both rows' per-sample outputs, or None where they cannot be paired."""
    lref, rref = lhs.samples_ref, rhs.samples_ref
    if lref is None or rref is None or lref.aggregate != rref.aggregate:
        return None
    lframe, rframe = samples_of(lhs), samples_of(rhs)
    if lframe is None or rframe is None:
        return None
    lframe, rframe = lframe[lframe["seed"].isin(lhs.seeds)], rframe[rframe["seed"].isin(rhs.seeds)]
    lframe, rframe = _seedless(claim.lhs, lhs, lframe, rhs), _seedless(claim.rhs, rhs, rframe, lhs)
    if lref.aggregate in (sample_outputs.MEAN, "accuracy"):
        ev = _paired_mean(claim, _per_unit(lframe, lhs), _per_unit(rframe, rhs))
    elif lref.aggregate == sample_outputs.MEDIAN:
        ev = _paired_median(claim, _per_unit(lframe, lhs), _per_unit(rframe, rhs))
    elif lref.aggregate == "auc" and lref.scale == rref.scale == 100:
        ev = _paired_auc(claim, lframe, rframe)
    else:
        return None
    paired = sorted(set(lframe["seed"]) & set(rframe["seed"]))
    if ev is None or not paired:
        return None
    if paired != sorted(set(lframe["seed"]) | set(rframe["seed"])):
        # pairing on (seed, unit) leaves out the seeds one row lacks: the lhs / rhs columns still show all of theirs
        ev.test += (f"; paired on seed{'s' if len(paired) > 1 else ''} {', '.join(map(str, paired))} only "
                    "(one row lacks the rest)")
    return ev


def _stands_for_every_seed(side: Side, rec: Record, other: Record) -> bool:
    """Whether ``side``'s record is one seedless run and ``other`` has seeds it lacks."""
    return side.seedless and len(rec.seeds) == 1 and bool(set(other.seeds) - set(rec.seeds))


def _seedless(side: Side, rec: Record, frame: pd.DataFrame, other: Record) -> pd.DataFrame:
    """``frame`` (``rec``'s per-sample lines), repeated under each of ``other``'s seeds where it stands for them."""
    if not _stands_for_every_seed(side, rec, other):
        return frame
    return pd.concat([frame.assign(seed=seed) for seed in other.seeds], ignore_index=True)


def evidence(claim: Claim, lhs: Record, rhs: Record, samples_of: SamplesOf = lambda rec: None,
             spread: bool = False, exact: bool = False) -> Evidence:
    """The paired difference of one claim check, by the first test that applies (see the module docstring)."""
    if exact:
        return Evidence("exact", 1, lhs.mean - (claim.factor * rhs.mean + claim.offset), exact=True)
    if spread:
        test = f"spread: Levene over {lhs.n}+{rhs.n} seeds"
        diff = lhs.mean - (claim.factor * rhs.mean + claim.offset)
        if min(lhs.n, rhs.n) < MIN_SPREAD_SEEDS:
            return Evidence(test + f" (needs {MIN_SPREAD_SEEDS} a side)", min(lhs.n, rhs.n), diff)
        result = stats.ttest_ind(lhs.values, claim.factor * np.asarray(rhs.values) + claim.offset)
        return Evidence(test, min(lhs.n, rhs.n), diff, float(result.pvalue), _interval_of(result))
    lhs_by_seed, rhs_by_seed = (
        {s: rec.values[0] for s in other.seeds} if _stands_for_every_seed(side, rec, other)
        else dict(zip(rec.seeds, rec.values, strict=True))
        for side, rec, other in ((claim.lhs, lhs, rhs), (claim.rhs, rhs, lhs)))
    d = np.array([v - (claim.factor * rhs_by_seed[s] + claim.offset)
                  for s, v in lhs_by_seed.items() if s in rhs_by_seed])
    paired = _paired_samples(claim, lhs, rhs, samples_of)
    if paired is not None:
        ev = _with_seed_variance(paired, d)
    elif d.size == 0:  # no shared seed: compare the means, undecided
        return Evidence("no shared seed", 0, lhs.mean - (claim.factor * rhs.mean + claim.offset))
    else:
        ev = _t_evidence(d, f"paired t over {len(d)} seed{'s' if len(d) != 1 else ''} (no per-unit outputs)")
    for side, rec, other in ((claim.lhs, lhs, rhs), (claim.rhs, rhs, lhs)):
        if _stands_for_every_seed(side, rec, other):
            ev.test += f"; {side.row}'s one run (no seed trains it) paired with each seed"
    return ev


# ------------------------------------------------------------------------------------------------ verdicts
def verdict(claim: Claim, low: float, high: float) -> str:
    """Holds if the interval of d lies on the claimed side of zero, does not hold if on the other side."""
    above, below = low > 0, high < 0
    if claim.op in ("<", "<="):
        above, below = below, above
    if above:
        return HOLDS
    return FAILS if below else INCONCLUSIVE


def _exact_verdict(claim: Claim, d: float) -> str:
    holds = {">": d > 0, ">=": d >= 0, "<": d < 0, "<=": d <= 0}[claim.op]
    return HOLDS if holds else FAILS


def adjusted_confidence(p_values: Iterable[float], alpha: float = ALPHA) -> tuple[np.ndarray, float]:
    """Benjamini–Hochberg adjusted p-values of a family and the false-coverage-adjusted confidence level
    ``1 − max(R, 1)·α/m`` of its intervals (R = p-values decided at ``alpha``)."""
    p = np.asarray(list(p_values), dtype=float)
    if p.size == 0:
        return p, 1 - alpha
    adjusted = stats.false_discovery_control(p, method="bh")
    decided = int(np.sum(adjusted <= alpha))
    return adjusted, 1 - max(decided, 1) * alpha / p.size


def evaluate_claims(reference: PaperReference, records: Iterable[Record], samples_of: SamplesOf = lambda rec: None,
                    alpha: float = ALPHA) -> pd.DataFrame:
    """One row per claim and dataset (:data:`COLUMNS`): both sides, the test, n, the mean paired difference ``difference``
    with its adjusted interval and confidence, the raw and BH-adjusted p-values, and the verdict."""
    by_key = {r.key: r for r in records}
    datasets = sorted({r.dataset for r in by_key.values()})
    rows: list[dict[str, Any]] = []
    found: list[tuple[Claim, Evidence | None]] = []
    for claim in reference.claims:
        claim_datasets = [claim.dataset] if claim.dataset else [
            d for d in datasets if (claim.table, d, claim.lhs.row, claim.lhs.metric) in by_key
            or (claim.table, d, claim.rhs.row, claim.rhs.metric) in by_key] or ["—"]
        for dataset in claim_datasets:
            lhs = by_key.get((claim.table, dataset, claim.lhs.row, claim.lhs.metric))
            rhs = by_key.get((claim.table, dataset, claim.rhs.row, claim.rhs.metric))
            ev = None if lhs is None or rhs is None else evidence(
                claim, lhs, rhs, samples_of, spread=claim.test == "spread", exact=claim.exact)
            rows.append({"claim": claim.id, "text": claim.text, "dataset": dataset, "lhs": format_value(lhs),
                         "rhs": format_value(rhs)})
            found.append((claim, ev))
    p_values = {i: ev.p for i, (_, ev) in enumerate(found) if ev is not None and not math.isnan(ev.p)}
    tested = list(p_values)
    adjusted, confidence = adjusted_confidence(p_values.values(), alpha)
    p_adj = dict(zip(tested, adjusted, strict=True))
    for i, (row, (claim, ev)) in enumerate(zip(rows, found, strict=True)):
        if ev is None:
            row.update(test="—", n=0, difference=math.nan, ci_low=math.nan, ci_high=math.nan, confidence=math.nan,
                       p=math.nan, p_adj=math.nan, status=NOT_RUN)
            continue
        row.update(test=ev.test, n=ev.n, difference=ev.diff, p=ev.p, p_adj=p_adj.get(i, math.nan))
        if ev.exact:
            row.update(ci_low=ev.diff, ci_high=ev.diff, confidence=1.0, status=_exact_verdict(claim, ev.diff))
        elif i in p_adj:
            low, high = ev.interval(confidence)
            row.update(ci_low=low, ci_high=high, confidence=confidence, status=verdict(claim, low, high))
        else:
            row.update(ci_low=math.nan, ci_high=math.nan, confidence=math.nan,
                       status=INCONCLUSIVE + (" (n=1)" if ev.n == 1 else ""))
    return pd.DataFrame(rows, columns=COLUMNS)


def readable(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table for reading: the difference and its interval to 2 decimals, the level in percent, the
    p-values to 2 significant digits (the CSV keeps full precision)."""
    def fixed(v: float) -> str:
        return "—" if math.isnan(v) else f"{v:+.2f}"

    def sig(v: float) -> str:
        return "—" if math.isnan(v) else f"{v:.2g}"

    return claims.assign(difference=claims["difference"].map(fixed), ci_low=claims["ci_low"].map(fixed),
                         ci_high=claims["ci_high"].map(fixed), p=claims["p"].map(sig), p_adj=claims["p_adj"].map(sig),
                         confidence=claims["confidence"].map(lambda v: "—" if math.isnan(v) else f"{100 * v:.1f} %"))


def describe(row) -> str:
    """``d [low, high] at C %, n=N, test`` of one claims-table row, for a printed line."""
    if row.status == NOT_RUN:
        return NOT_RUN
    if row.test == "exact":
        return f"d = {row.difference:+.2f} (exact)"
    if math.isnan(row.ci_low):
        return f"d = {row.difference:+.2f}, no interval (n={row.n}; {row.test})"
    return (f"d = {row.difference:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}] at {100 * row.confidence:.1f} % "
            f"(BH-adjusted), p_adj = {row.p_adj:.3f}, {row.test}")


def wall_clock_claims(reference: PaperReference, records: Iterable[Record]) -> set[str]:
    """Ids of the claims whose left-hand side is a wall-clock time (its records' unit is s or ms)."""
    units = {(r.table, r.row, r.metric): r.unit for r in records}
    return {c.id for c in reference.claims if units.get((c.table, c.lhs.row, c.lhs.metric)) in WALL_CLOCK_UNITS}


def claim_lines(claims: pd.DataFrame, wall_clock: Set[str] = frozenset()) -> list[str]:
    """``[status] text (dataset): d [interval] …`` for every claim that ran, wall-clock ones marked, then a count."""
    ran = claims[claims.status != NOT_RUN]
    lines = [f"[{c.status}] {c.text} ({c.dataset}): {describe(c)}"
             + (f" {WALL_CLOCK_NOTE}" if c.claim in wall_clock else "") for c in ran.itertuples()]
    counts = ", ".join(f"{n} {status}" for status, n in ran.status.value_counts().sort_index().items())
    return [*lines, f"{len(ran)} claim checks run ({counts}); {len(claims) - len(ran)} not run at this profile"]


def judge_store(store: ResultStore) -> tuple[pd.DataFrame, list[str]]:
    """Judge the claims of ``store``'s paper on its records and per-sample outputs, save them as its ``claims``
    table (CSV and Markdown) and return them with their printed lines (wall-clock claims marked)."""
    reference = results.load_reference(store.paper)
    records = store.records()
    claims = evaluate_claims(reference, records, store.samples)
    store.save_table(claims, "claims", markdown=readable(claims))
    return claims, claim_lines(claims, wall_clock_claims(reference, records))


SUMMARY_COLUMNS = ["paper", "profile", *COLUMNS]
TALLY_STATUSES = (HOLDS, FAILS, INCONCLUSIVE)


def summary(root: Path) -> pd.DataFrame:
    """Every claim check of every paper and profile under ``root`` (its ``<paper>/<profile>/claims.csv``)."""
    frames = [pd.read_csv(path).assign(paper=path.parents[1].name, profile=path.parent.name)
              for path in sorted(Path(root).glob("*/*/claims.csv"))]
    if not frames:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.concat(frames, ignore_index=True).reindex(columns=SUMMARY_COLUMNS)


def tally(claims: pd.DataFrame) -> pd.DataFrame:
    """Claim checks per paper and profile by verdict ("inconclusive (n=1)" counted as inconclusive)."""
    status = claims["status"].str.replace(" (n=1)", "", regex=False)
    counts = pd.crosstab([claims["paper"], claims["profile"]], status)
    return counts.reindex(columns=[*TALLY_STATUSES, NOT_RUN], fill_value=0).reset_index()


def write_summary(root: Path) -> pd.DataFrame:
    """Write ``<root>/summary.csv`` (every claim check, :func:`summary`) and ``<root>/summary.md`` (the tally)."""
    claims = summary(root)
    atomic_write(Path(root) / "summary.csv", claims.to_csv(index=False))
    counts = tally(claims) if len(claims) else pd.DataFrame(columns=["paper", "profile", *TALLY_STATUSES, NOT_RUN])
    atomic_write(Path(root) / "summary.md", results.to_markdown(counts) + "\n")
    return claims

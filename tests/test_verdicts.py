"""Claims judged on paired differences: each test on known cases, and the judge calibrated on simulated data."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mdbench import results as R
from mdbench import samples as S
from mdbench import verdicts as V


def _claim(op=">", factor=1.0, offset=0.0, metric="acc", **kw):
    return R.Claim(id="c", text="A beats B", table="t1", lhs=R.Side("A", metric), op=op, rhs=R.Side("B", metric),
                   factor=factor, offset=offset, **kw)


def _record(row, values, metric="acc", seeds=None, samples=None):
    return R.Record(paper="toy", table="t1", row=row, metric=metric, values=list(values),
                    seeds=list(seeds if seeds is not None else range(len(values))), dataset="d",
                    dataset_checksum="-", profile="cpu", config={}, samples=samples)


def _reference(*claims):
    return R.PaperReference(paper="toy", title="Toy", citation="-", reported={}, claims=list(claims), tolerance={})


def _unit_records(a: np.ndarray, b: np.ndarray, metric="dsc", weights=None):
    """Records of rows A and B whose per-unit values (seeds × units) are a and b, and their samples lookup."""
    frames = {}
    recs = []
    for row, values in (("A", a), ("B", b)):
        seeds, units = np.indices(values.shape)
        frame = pd.DataFrame({"seed": seeds.ravel(), "unit": [f"u{u}" for u in units.ravel()], "metric": metric,
                              "value": values.ravel()})
        if weights is not None:
            frame["weight"] = np.tile(weights, values.shape[0])
        frames[row] = frame
        w = np.ones(values.shape[1]) if weights is None else np.asarray(weights)
        per_seed = (values * w).sum(axis=1) / w.sum()
        recs.append(_record(row, per_seed, metric, samples={"file": row, "aggregate": S.MEAN}))
    return recs, lambda rec: frames[rec.samples["file"]]


def _judge(claim, lhs, rhs, samples_of=lambda rec: None):
    return V.evaluate_claims(_reference(claim), [lhs, rhs], samples_of).iloc[0]


# ------------------------------------------------------------------------------------------------ known cases
def test_paired_t_over_units_uses_scipy_and_pairs_within_seeds():
    rng = np.random.default_rng(0)
    base = rng.normal(70, 10, (1, 30))      # case difficulty: shared by both rows, cancels in the pairing
    a, b = base + 2 + rng.normal(0, 1, base.shape), base + rng.normal(0, 1, base.shape)
    (lhs, rhs), samples_of = _unit_records(a, b)
    row = _judge(_claim(metric="dsc"), lhs, rhs, samples_of)
    d = a[0] - b[0]
    from scipy import stats
    ci = stats.ttest_1samp(d, 0).confidence_interval(0.95)
    assert row.test == "paired t over 30 units" and row.n == 30
    assert row.difference == pytest.approx(d.mean()) and (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high))
    assert row.status == V.HOLDS
    # unpaired, the same numbers would not decide: the case spread (SD 10) swamps a 2-point effect at n = 1 seed
    assert _judge(_claim(metric="dsc"), _record("A", [a.mean()], "dsc"), _record("B", [b.mean()], "dsc")
                  ).status == "inconclusive (n=1)"


def test_training_seed_variance_widens_a_paired_interval():
    """A's training went astray on one seed (every case 10 points down), up on another: averaged over seeds, every
    case favours A by about 1 point with tiny case noise, but three seeds say nothing about the method."""
    rng = np.random.default_rng(7)
    base = rng.normal(70, 10, (1, 40))
    shifts = np.array([[+7.0], [-9.0], [+5.0]])
    a = base + 1 + shifts + rng.normal(0, 0.3, (3, 40))
    b = base + rng.normal(0, 0.3, (3, 40))
    (lhs, rhs), samples_of = _unit_records(a, b)
    row = _judge(_claim(metric="dsc"), lhs, rhs, samples_of)
    assert row.status == V.INCONCLUSIVE
    # the seeds' spread dominates: about n_seeds - 1 degrees of freedom, whatever the 40 units
    assert re.fullmatch(r"paired t over 40 units and 3 seeds \(t with 2\.\d df\)", row.test)
    assert row.ci_high - row.ci_low > 10
    (lhs, rhs), samples_of = _unit_records(a[:1] - shifts[0], b[:1])
    assert _judge(_claim(metric="dsc"), lhs, rhs, samples_of).status == V.HOLDS  # the same cases, one seed: the case-level interval alone decides


def test_the_claimed_side_decides_and_the_offset_and_factor_apply():
    rng = np.random.default_rng(1)
    a = rng.normal(80, 1, (2, 40))
    b = a + 0.5 + rng.normal(0, 0.2, a.shape)   # B is 0.5 above A on every case
    (lhs, rhs), samples_of = _unit_records(a, b)
    assert _judge(_claim(metric="dsc"), lhs, rhs, samples_of).status == V.FAILS
    assert _judge(_claim(">=", offset=-1, metric="dsc"), lhs, rhs, samples_of).status == V.HOLDS  # within 1 point
    assert _judge(_claim("<", metric="dsc"), lhs, rhs, samples_of).status == V.HOLDS
    assert _judge(_claim("<=", factor=0.5, metric="dsc"), lhs, rhs, samples_of).status == V.FAILS  # 80 > 40


def test_a_macro_average_is_bootstrapped_with_its_weights():
    rng = np.random.default_rng(2)
    weights = np.r_[np.full(4, 1 / 8), np.full(20, 1 / 40)]   # two modalities of 4 and 20 cases, equal weight
    a = rng.normal(80, 5, (1, 24))
    b = a - np.r_[np.full(4, 6.0), np.zeros(20)][None, :] + rng.normal(0, 0.5, a.shape)  # B worse on modality 1
    (lhs, rhs), samples_of = _unit_records(a, b, weights=weights)
    row = _judge(_claim(metric="dsc"), lhs, rhs, samples_of)
    assert row.test == "bootstrap over 24 units"
    assert row.difference == pytest.approx(lhs.mean - rhs.mean)   # the weighted difference, as the records have it
    assert row.ci_low < row.difference < row.ci_high


def test_rows_with_their_own_units_and_weights_still_pair():
    """B failed to score one case of the small modality, so its weights differ from A's: the bootstrap keeps each
    row's own units and weights, and its point estimate is the difference of the two records."""
    lines = {"A": pd.DataFrame({"seed": 0, "unit": ["m1", "m2", "u1", "u2", "u3", "u4"], "metric": "dsc",
                                "value": [90.0, 80.0, 70.0, 72.0, 74.0, 76.0],
                                "weight": [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]}),
             "B": pd.DataFrame({"seed": 0, "unit": ["m1", "u1", "u2", "u3", "u4"], "metric": "dsc",
                                "value": [60.0, 69.0, 71.0, 73.0, 75.0], "weight": [0.5, 0.125, 0.125, 0.125, 0.125]})}
    recs = [_record(row, [float(np.average(f.value, weights=f.weight))], "dsc", samples={"file": row, "aggregate": S.MEAN})
            for row, f in lines.items()]
    row = _judge(_claim(metric="dsc"), *recs, lambda rec: lines[rec.samples["file"]])
    assert row.test == "bootstrap over 6 units" and row.difference == pytest.approx(recs[0].mean - recs[1].mean)


def test_a_row_of_three_seeds_against_a_one_seed_baseline_says_which_seed_was_paired():
    """DAFT's trained rows have three seeds, the LiteMedSAM baseline one: pairing on (seed, unit) keeps seed 0 only,
    and the test column says so, since the lhs column shows the mean of all three."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(80, 5, (3, 20)), rng.normal(75, 5, (1, 20))
    (lhs, rhs), samples_of = _unit_records(a, b)
    row = _judge(_claim(metric="dsc"), lhs, rhs, samples_of)
    assert row.difference == pytest.approx(a[0].mean() - b[0].mean())  # seed 0 only
    assert row.test.endswith("; paired on seed 0 only (one row lacks the rest)")
    same, same_samples = _unit_records(a, a[:, ::-1])
    assert "only" not in _judge(_claim(metric="dsc"), *same, same_samples).test  # every seed paired: no note


def test_a_seedless_baseline_pairs_with_every_seed_of_the_trained_row():
    """LiteMedSAM is scored as it is (no seed trains it): marked seedless, its one run pairs with each of DAFT's
    seeds, so d per unit is DAFT's mean over seeds minus the baseline, and the seeds' spread widens the interval."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(80, 5, (3, 20)) + np.array([[0.0], [3.0], [-3.0]]), rng.normal(75, 5, (1, 20))
    (lhs, rhs), samples_of = _unit_records(a, b)
    claim = R.Claim(id="c", text="A beats B", table="t1", lhs=R.Side("A", "dsc"), op=">",
                    rhs=R.Side("B", "dsc", seedless=True))
    row = _judge(claim, lhs, rhs, samples_of)
    assert row.n == 20 and row.difference == pytest.approx((a.mean(axis=0) - b[0]).mean())
    assert row.test.startswith("paired t over 20 units and 3 seeds (t with")  # the seeds' spread, baseline fixed
    assert row.test.endswith("; B's one run (no seed trains it) paired with each seed") and "only" not in row.test
    unmarked = _judge(_claim(metric="dsc"), lhs, rhs, samples_of)
    assert unmarked.test.endswith("paired on seed 0 only (one row lacks the rest)")
    assert unmarked.ci_high - unmarked.ci_low < row.ci_high - row.ci_low  # seed 0 alone hid the seeds' spread
    # without per-unit outputs: a paired t over the three seeds, each against the one baseline run
    seeds_only = _judge(claim, _record("A", a.mean(axis=1), "dsc"), _record("B", b.mean(axis=1), "dsc"))
    assert seeds_only.test.startswith("paired t over 3 seeds (no per-unit outputs); B's one run")
    assert seeds_only.difference == pytest.approx(a.mean() - b.mean())


def test_auc_difference_is_bootstrapped_over_units_and_matches_sklearn():
    rng = np.random.default_rng(3)
    n = 200
    y = np.arange(n) % 2
    good, poor = y + rng.normal(0, 0.6, n), y + rng.normal(0, 1.5, n)
    frames, recs = {}, []
    for row, score in (("A", good), ("B", poor)):
        p1 = 1 / (1 + np.exp(-score))
        frames[row] = S.classifier_frame(0, [f"img{i}" for i in range(n)], y, np.c_[1 - p1, p1])
        recs.append(_record(row, [100 * roc_auc_score(y, p1)], "auc",
                            samples={"file": row, "aggregate": "auc", "scale": 100}))
    counts = np.ones((1, n))
    assert V._weighted_auc(counts, y, frames["A"][["prob_0", "prob_1"]].to_numpy())[0] == pytest.approx(recs[0].mean)
    row = _judge(_claim(metric="auc"), *recs, lambda rec: frames[rec.samples["file"]])
    assert row.test == "bootstrap over 200 units" and row.difference == pytest.approx(recs[0].mean - recs[1].mean)
    assert row.status == V.HOLDS


def test_multiclass_auc_matches_sklearn_ovr_macro():
    rng = np.random.default_rng(4)
    y = np.arange(60) % 3
    probs = rng.dirichlet(np.ones(3), 60)
    expected = 100 * roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert V._weighted_auc(np.ones((1, 60)), y, probs)[0] == pytest.approx(expected)


def test_seed_level_pairing_and_one_value_is_inconclusive():
    lhs, rhs = _record("A", [80, 82, 84]), _record("B", [70, 73, 75])
    row = _judge(_claim(), lhs, rhs)
    assert row.test.startswith("paired t over 3 seeds") and row.n == 3 and row.difference == pytest.approx(9.33, abs=0.01)
    one = _judge(_claim(), _record("A", [90]), _record("B", [10]))
    assert one.status == "inconclusive (n=1)" and math.isnan(one.ci_low)


def _timing_records(lhs_ms: np.ndarray, rhs_ms: np.ndarray, metric="s"):
    """Rows A and B timed in shared rounds (one unit per repeat, ``rep00`` …): records of their medians."""
    frames = {row: pd.DataFrame({"seed": 0, "unit": S.repeat_units(len(ms)), "metric": metric, "value": ms})
              for row, ms in (("A", lhs_ms), ("B", rhs_ms))}
    recs = [_record(row, [np.median(ms)], metric, samples={"file": row, "aggregate": S.MEDIAN})
            for row, ms in (("A", lhs_ms), ("B", rhs_ms))]
    return recs, lambda rec: frames[rec.samples["file"]]


def test_timing_medians_are_bootstrapped_over_paired_repeats():
    """A student timed against a teacher in shared rounds: the machine's load of a round slows both, and the claim
    "the student takes at most a tenth of the teacher's time" is judged on the difference of medians, repeats
    resampled in pairs (the same as SciPy's paired percentile bootstrap)."""
    from scipy import stats

    rng = np.random.default_rng(3)
    load = rng.gamma(2.0, 1.0, 12)                       # per round, shared by both rows
    student = 1.0 + 0.1 * load + rng.normal(0, 0.02, 12)
    teacher = 20.0 + 2.0 * load + rng.normal(0, 0.4, 12)
    (lhs, rhs), samples_of = _timing_records(student, teacher)
    claim = _claim("<=", factor=0.1, metric="s")
    row = _judge(claim, lhs, rhs, samples_of)
    assert row.test == "bootstrap of medians over 12 units" and row.n == 12
    assert row.difference == pytest.approx(np.median(student) - 0.1 * np.median(teacher))
    ci = stats.bootstrap((student, teacher), lambda s, t, axis: np.median(s, axis) - 0.1 * np.median(t, axis),
                         paired=True, vectorized=True, n_resamples=V.N_RESAMPLES, method="percentile",
                         random_state=np.random.default_rng(0)).confidence_interval
    assert (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high)) and row.confidence == 0.95
    assert row.status == V.HOLDS and row.ci_high < 0
    # a fiftieth of the teacher's ~24.1 s asks the student for ~0.48 s against its ~1.19: it does not hold
    assert _judge(_claim("<=", factor=0.02, metric="s"), lhs, rhs, samples_of).status == V.FAILS
    (one_l, one_r), one_of = _timing_records(student[:1], teacher[:1])  # one repeat: no interval
    assert _judge(claim, one_l, one_r, one_of).status == "inconclusive (n=1)"


def test_exact_quantities_are_compared_as_they_are():
    lhs, rhs = _record("A", [24.0], "flops"), _record("B", [100.0], "flops")
    assert _judge(_claim("<=", factor=0.25, metric="flops", exact=True), lhs, rhs).status == V.HOLDS
    assert _judge(_claim("<=", factor=0.2, metric="flops", exact=True), lhs, rhs).status == V.FAILS


def test_spread_claims_need_three_seeds_a_side():
    spread = _claim("<", metric="dev", test="spread")
    few = _judge(spread, _record("A", [0.1, 0.1], "dev"), _record("B", [3.0, 3.0], "dev"))
    assert few.status == "inconclusive" and "needs 3 a side" in few.test
    many = _judge(spread, _record("A", [0.1, 0.2, 0.1, 0.15, 0.12], "dev"),
                  _record("B", [3.0, 2.5, 3.4, 2.9, 3.1], "dev"))
    assert many.status == V.HOLDS and many.test.startswith("spread: Levene")


def test_not_run_when_a_side_is_missing():
    table = V.evaluate_claims(_reference(_claim()), [_record("A", [0.9])])
    assert table.status.tolist() == [V.NOT_RUN] and table.rhs.tolist() == [R.NOT_RUN]


def test_benjamini_hochberg_widens_the_intervals_of_a_family():
    """Of 20 claims, one with p ≈ 0.01 alone is decided; in a family of 19 null claims it is not."""
    rng = np.random.default_rng(5)
    p, confidence = V.adjusted_confidence([0.01])
    assert confidence == pytest.approx(0.95) and p[0] == pytest.approx(0.01)
    p, confidence = V.adjusted_confidence([0.01, *rng.uniform(0.3, 1, 19)])
    assert p[0] == pytest.approx(0.2) and confidence == pytest.approx(1 - 0.05 / 20)


# --------------------------------------------------------------------------------------------- calibration
def _band_overlap_rule(claim, lhs, rhs, samples_of):
    """mdbench's rule before issue 14: holds if the mean ± SD bands of the two rows' seeds do not overlap."""
    lo, hi = lhs.mean - lhs.std, lhs.mean + lhs.std
    rlo, rhi = rhs.mean - rhs.std, rhs.mean + rhs.std
    return V.HOLDS if lo > rhi else (V.FAILS if hi < rlo else V.INCONCLUSIVE)


def _new_rule(claim, lhs, rhs, samples_of):
    return V.evaluate_claims(_reference(claim), [lhs, rhs], samples_of).status.iloc[0]


def _holds_rate(rule, effect, n_units, n_seeds=1, trials=300, seed=0):
    """How often ``rule`` says "A beats B" on simulated paired data: per-unit values with a shared unit effect
    (SD 1), a row effect ``effect`` (in SD of the paired difference) and noise."""
    rng = np.random.default_rng(seed)
    holds = 0
    for _ in range(trials):
        unit = rng.normal(0, 1, (n_seeds, n_units))
        a = unit + effect + rng.normal(0, 1 / math.sqrt(2), unit.shape)
        b = unit + rng.normal(0, 1 / math.sqrt(2), unit.shape)
        (lhs, rhs), samples_of = _unit_records(a, b)
        holds += rule(_claim(metric="dsc"), lhs, rhs, samples_of) == V.HOLDS
    return holds / trials


def _calibrated(rule) -> bool:
    """The judge's contract: false "holds" under no effect at most 5 % (plus 2 Monte-Carlo SE), power at a 0.5-SD
    effect that rises with n and reaches 80 % at 40 units."""
    false_holds = _holds_rate(rule, 0.0, 12)
    mc_se = math.sqrt(0.05 * 0.95 / 300)
    power_10, power_40 = _holds_rate(rule, 0.5, 10, seed=1), _holds_rate(rule, 0.5, 40, seed=2)
    return false_holds <= 0.05 + 2 * mc_se and power_40 >= 0.8 and power_40 > power_10


def test_the_judge_is_calibrated():
    assert _calibrated(_new_rule)


def test_the_old_band_overlap_rule_fails_the_calibration():
    """With one seed its band has zero width: it says "holds" whenever A's mean is above, half the time under no
    effect. The calibration test can fail."""
    assert _holds_rate(_band_overlap_rule, 0.0, 12) > 0.3
    assert not _calibrated(_band_overlap_rule)


def test_auc_bootstrap_is_calibrated_under_no_effect():
    """Two classifiers of equal quality on the same 80 images: the AUC bootstrap says "A beats B" at most ~5 %."""
    rng = np.random.default_rng(6)
    y = np.arange(80) % 2
    trials, holds = 120, 0
    for _ in range(trials):
        shared = y + rng.normal(0, 1, 80)
        frames, recs = {}, []
        for row in ("A", "B"):
            p1 = 1 / (1 + np.exp(-(shared + rng.normal(0, 0.7, 80))))
            frames[row] = S.classifier_frame(0, [f"i{i}" for i in range(80)], y, np.c_[1 - p1, p1])
            recs.append(_record(row, [100 * roc_auc_score(y, p1)], "auc",
                                samples={"file": row, "aggregate": "auc", "scale": 100}))
        holds += _judge(_claim(metric="auc"), *recs, lambda rec, f=frames: f[rec.samples["file"]]).status == V.HOLDS
    assert holds / trials <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)


# ---------------------------------------------------------------------------------------------- judge command
def test_judge_command_rejudges_stored_records_and_writes_the_summary(tmp_path, capsys):
    from mdbench.cli import main

    store = R.ResultStore("quickstart", "cpu", root=tmp_path)
    for row, values in (("trained", [90.0, 91.0, 93.0]), ("untrained", [50.0, 52.0, 49.0])):
        for metric in ("accuracy", "auc"):
            store.record("table1", row, metric, values, dataset="d", dataset_checksum="-", config={})
    assert main(["judge", "--profile", "cpu", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== quickstart (cpu)" in out and "[holds] the trained CNN's test accuracy" in out
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary[["paper", "profile", "claim"]].values.tolist() == [
        ["quickstart", "cpu", "training_helps_accuracy"], ["quickstart", "cpu", "training_helps_auc"]]
    assert "| quickstart | cpu | 2 | 0 | 0 | 0 |" in (tmp_path / "summary.md").read_text()
    assert main(["judge", "--profile", "gpu", "--results-dir", str(tmp_path)]) == 2


def test_the_readme_tally_is_the_committed_summary():
    readme = (R.results_root().parent / "README.md").read_text()
    block = readme.split("<!-- tally: begin -->\n")[1].split("<!-- tally: end -->")[0]
    assert block == (R.results_root() / "summary.md").read_text(), "copy results/summary.md into the README's tally"

"""Per-sample outputs: written beside the records, read back to the same aggregate, bad ones refused."""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from mdbench import metrics, notebook, results
from mdbench import samples as S


def _session(tmp_path):
    store = results.ResultStore("paper", "cpu", root=tmp_path)
    return notebook.Session("paper", "cpu", None, store, True, {})


def _classifier(seeds=(0, 1), n=40, classes=3, offset=0):
    rng = np.random.default_rng(offset)
    lines, values = [], []
    for seed in seeds:
        y = np.arange(n) % classes
        p = rng.dirichlet(np.ones(classes), n)
        lines.append(S.classifier_frame(seed, [f"case{i}" for i in range(n)], y, p).assign(row="A"))
        m = metrics.classification_metrics(y, p)
        values += [{"row": "A", "metric": k, "seed": seed, "value": 100 * m[k]} for k in ("accuracy", "auc")]
    return pd.concat(lines), pd.DataFrame(values)


def test_classifier_outputs_reproduce_each_seed(tmp_path):
    session = _session(tmp_path)
    lines, values = _classifier()
    session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines)
    recs = session.store.records()
    assert {r.metric for r in recs} == {"accuracy", "auc"}
    for rec in recs:
        frame = session.store.samples(rec)
        assert len(frame) == 80 and set(frame["seed"]) == {0, 1}
        again = [S.aggregate(frame[frame.seed == s], rec.samples_ref, rec.metric) for s in rec.seeds]
        assert again == pytest.approx(rec.values, rel=1e-12)


def test_per_unit_values_with_weights_reproduce_a_macro_mean(tmp_path):
    session = _session(tmp_path)
    # two modalities with 1 and 3 cases: the macro mean weights each modality equally
    lines = pd.DataFrame({"row": "A", "seed": 0, "unit": ["a", "b", "c", "d"], "metric": "dsc",
                          "value": [90.0, 10.0, 20.0, 30.0], "weight": [0.5, 1 / 6, 1 / 6, 1 / 6]})
    values = pd.DataFrame([{"row": "A", "metric": "dsc", "seed": 0, "value": (90 + 20) / 2},
                           {"row": "A", "metric": "params", "seed": 0, "value": 3.0}])
    session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines)
    by_metric = {r.metric: r for r in session.store.records()}
    assert by_metric["dsc"].samples_ref.aggregate == S.MEAN
    assert by_metric["params"].samples is None  # no per-unit values of it: no pointer


def test_timing_repeats_reproduce_a_median_and_count_as_units(tmp_path):
    session = _session(tmp_path)
    lines = pd.DataFrame({"row": "A", "seed": 0, "unit": S.repeat_units(4), "metric": "ms",
                          "value": [3.0, 1.0, 100.0, 2.0]})  # one slow repeat (a load spike) does not move it
    assert S.repeat_units(4) == ["rep00", "rep01", "rep02", "rep03"]
    values = pd.DataFrame([{"row": "A", "metric": "ms", "value": 2.5}, {"row": "A", "metric": "flops", "value": 7.0}])
    session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines,
                         aggregate=S.MEDIAN)
    by_metric = {r.metric: r for r in session.store.records()}
    ref = by_metric["ms"].samples_ref
    assert ref.aggregate == S.MEDIAN and by_metric["flops"].samples is None
    assert S.count_units(session.store.samples(by_metric["ms"]), ref, "ms", [0]) == 4
    with pytest.raises(S.SamplesError, match="give 2.5"):  # the mean (26.5) is not the record's value
        session.record_frame("t1", values.assign(value=[26.5, 7.0]), dataset="d", dataset_checksum="c",
                             config={}, samples=lines, aggregate=S.MEDIAN)
    with pytest.raises(S.SamplesError, match="takes no weights"):
        S.aggregate(lines.assign(weight=[1, 1, 2, 1]), ref, "ms")
    with pytest.raises(ValueError, match="aggregate must be one of"):
        session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines,
                             aggregate="auc")


def test_a_rows_file_is_read_once_for_all_its_metrics(tmp_path, monkeypatch):
    session = _session(tmp_path)
    lines = pd.DataFrame({"row": "A", "seed": 0, "unit": ["a", "b"] * 3, "metric": np.repeat(["m1", "m2", "m3"], 2),
                          "value": [1.0, 3.0, 2.0, 4.0, 5.0, 7.0]})
    values = pd.DataFrame({"row": "A", "metric": ["m1", "m2", "m3"], "value": [2.0, 3.0, 6.0]})
    reads = []
    monkeypatch.setattr(S, "read", lambda path, real=S.read: reads.append(path.name) or real(path))
    session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines)
    assert reads == ["t1__d__A.samples.csv.gz"] and len(session.store.records()) == 3


def test_outputs_that_do_not_add_up_are_refused_and_no_record_is_written(tmp_path):
    session = _session(tmp_path)
    lines, values = _classifier()
    values.loc[0, "value"] += 0.5
    with pytest.raises(S.SamplesError, match="seed 0"):
        session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines)
    assert not list(session.store.records_dir.glob("*.json"))


@pytest.mark.parametrize("bad, match", [
    (lambda f: f.drop(columns=["unit"]), "unit"),
    (lambda f: f.drop(columns=["label"]), "label"),
    (lambda f: pd.concat([f, f.iloc[:1]]), "repeat"),
    (lambda f: f.assign(prob_0=np.nan), "non-finite"),
])
def test_malformed_outputs_are_named(tmp_path, bad, match):
    lines, _ = _classifier(seeds=(0,))
    with pytest.raises(S.SamplesError, match=match):
        _session(tmp_path).store.write_samples("t1", "d", "A", bad(lines.drop(columns=["row"])))


def test_a_corrupt_file_says_how_to_remake_it(tmp_path):
    session = _session(tmp_path)
    lines, values = _classifier(seeds=(0,))
    session.record_frame("t1", values, dataset="d", dataset_checksum="c", config={}, samples=lines)
    rec = session.store.records()[0]
    (session.store.records_dir / rec.samples["file"]).write_bytes(gzip.compress(b"garbage")[:10])
    with pytest.raises(S.SamplesError, match="rerun the notebook"):
        session.store.samples(rec)


def test_same_outputs_give_the_same_bytes():
    lines, _ = _classifier(seeds=(0,))
    assert S.to_bytes(lines) == S.to_bytes(lines.copy())


def test_one_frame_over_datasets_of_different_class_counts(tmp_path):
    """Outputs concatenated over a 2-class and a 3-class dataset: each row keeps only its own prob columns."""
    session = _session(tmp_path)
    two, two_values = _classifier(seeds=(0,), classes=2)
    three, three_values = _classifier(seeds=(0,), classes=3, offset=1)
    samples = pd.concat([two.assign(dataset="binary"), three.assign(dataset="three")])
    values = pd.concat([two_values.assign(dataset="binary"), three_values.assign(dataset="three")])
    session.record_frame("t1", values, dataset_checksum="c", config={}, samples=samples)
    for rec in session.store.records():
        assert len(S.prob_columns(session.store.samples(rec))) == (2 if rec.dataset == "binary" else 3)

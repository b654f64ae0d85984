"""The results contract: records, paper references, claims and tables (atomic writes: tests/test_io.py)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from mdbench import results as R
from mdbench import samples as S
from mdbench.paper_yaml import PaperFileError, known_papers

CONFIG = {"lr": 1e-3, "epochs": 2}


def _store(tmp_path, paper="toy", profile="smoke"):
    return R.ResultStore(paper, profile, root=tmp_path)


def _write(store, row, metric, values, table="t1", dataset="synthetic"):
    return store.record(table, row, metric, values, dataset=dataset, dataset_checksum="abc", config=CONFIG)


def test_record_round_trip_and_statistics(tmp_path):
    store = _store(tmp_path)
    rec = _write(store, "A", "acc", [0.8, 0.9, 1.0])
    assert rec.n == 3 and math.isclose(rec.mean, 0.9) and math.isclose(rec.std, 0.1)
    assert rec.seeds == [0, 1, 2] and rec.fingerprint["packages"]["torch"] != "not installed"
    loaded = store.get("t1", "A", "acc", dataset="synthetic")
    assert loaded.as_dict() == rec.as_dict()
    assert store.get("t1", "A", "acc", dataset="synthetic", config={"lr": 1}) is None  # other config: no resume
    assert store.get("t1", "A", "acc", dataset="synthetic", config=dict(reversed(CONFIG.items()))) is not None
    assert [r.key for r in store.records()] == [("t1", "synthetic", "A", "acc")]


def test_single_seed_has_zero_std(tmp_path):
    rec = _write(_store(tmp_path), "A", "acc", 0.5)
    assert rec.n == 1 and rec.std == 0.0


@pytest.mark.parametrize("values", [[], [float("nan")], [1.0, float("inf")]])
def test_bad_values_are_refused(tmp_path, values):
    with pytest.raises(R.RecordError):
        _write(_store(tmp_path), "A", "acc", values)


def test_seed_count_must_match(tmp_path):
    with pytest.raises(R.RecordError, match="2 values but 1 seeds"):
        _store(tmp_path).record("t1", "A", "acc", [1, 2], seeds=[0], dataset="d", dataset_checksum="", config={})


def test_corrupt_record_file_is_named(tmp_path):
    store = _store(tmp_path)
    path = _write(store, "A", "acc", [1.0]) and store.record_path("t1", "synthetic", "A", "acc")
    path.write_text("{ not json")
    with pytest.raises(R.RecordError, match=str(path)):
        store.records()
    data = json.loads(json.dumps({**_write(store, "A", "acc", [1.0]).as_dict(), "mean": 7.0}))
    path.write_text(json.dumps(data))
    with pytest.raises(R.RecordError, match="disagree"):
        R.load_record(path)


def test_temp_file_of_an_interrupted_write_is_not_a_record(tmp_path):
    store = _store(tmp_path)
    path = _write(store, "A", "acc", [1.0]) and store.record_path("t1", "synthetic", "A", "acc")
    (path.parent / ".tmp-abc123.json").write_text('{"cut off')  # what a kernel killed mid-write leaves
    assert [r.key for r in store.records()] == [("t1", "synthetic", "A", "acc")]


# ------------------------------------------------------------------------------------------------ references
def _reference(tmp_path, claims, reported=None, tolerance=None, **more):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"paper": "toy", "title": "Toy", "citation": "Nobody 2026",
                                    "reported": reported or {}, "claims": claims, "tolerance": tolerance or {},
                                    **more}))
    return R.load_reference("toy", path)


def _claim(op=">", factor=1.0, offset=0.0, metric="acc"):
    return {"id": "c", "text": "A beats B", "table": "t1", "lhs": {"row": "A", "metric": metric}, "op": op,
            "rhs": {"row": "B", "metric": metric}, "factor": factor, "offset": offset}


def test_reference_refuses_guessed_values_and_bad_ops(tmp_path):
    with pytest.raises(R.PaperReferenceError, match="neither a number"):
        _reference(tmp_path, [], reported={"t1": {"A": {"acc": "about 90"}}})
    with pytest.raises(R.PaperReferenceError, match="unknown op"):
        _reference(tmp_path, [_claim(op="=>")])
    with pytest.raises(R.PaperReferenceError, match="unknown test"):
        _reference(tmp_path, [{**_claim(), "test": "vibes"}])
    with pytest.raises(PaperFileError, match="unknown paper 'no_such_paper'.*; known papers: daft, efcm, "):
        R.load_reference("no_such_paper")


def test_the_tables_are_those_reported_with_their_digits(tmp_path):
    reported = {"t1": {"A": {"acc": 1.0}}, "costs": {"A": {"ms": R.NOT_REPORTED}}}
    assert _reference(tmp_path, [], reported, digits={"costs": 4}).tables == {"t1": 2, "costs": 4}
    for digits in ({"t2": 3}, {"t1": 1.5}, {"t1": -1}):  # a table not reported (a typo), not a whole number
        with pytest.raises(R.PaperReferenceError, match="digits must map tables of reported"):
            _reference(tmp_path, [], reported, digits=digits)


def test_table_beside_paper_values(tmp_path):
    store = _store(tmp_path, profile="cpu")
    _write(store, "A", "acc", [90.0, 92.0])
    _write(store, "C", "acc", [50.0])
    _write(store, "D", "acc", [70.0])
    _write(store, "E", "ms", [5.0])
    ref = _reference(tmp_path, [], reported={"t1": {"A": {"acc": 91.5}, "B": {"acc": 80.0},
                                                    "C": {"acc": R.NOT_REPORTED}, "D": {"acc": 75.0},
                                                    "E": {"ms": 9.0}}}, tolerance={"t1": 1.0})
    ref.comparable["t1"] = ["D"]
    ref = R.PaperReference(**{**ref.__dict__, "lower_is_better": frozenset({"ms"})})
    table = R.build_table(ref, store.records(), "t1").set_index("row")
    assert list(table.index) == ["A", "C", "D", "E"]  # B, not run, is left out of the default view
    assert table.loc["A", "paper"] == "91.50" and table.loc["A", "delta"] == "-0.50"
    assert table.loc["A", "reproduced"] == "91.00 ± 1.41 (n=2)"
    assert table.loc["A", "status"] == R.NOT_COMPARABLE and table.loc["A", "vs_paper"] == "within tolerance"
    assert table.loc["D", "status"] == R.COMPARABLE and table.loc["D", "vs_paper"] == "worse"
    assert table.loc["E", "vs_paper"] == "better"  # 5 ms against the paper's 9: lower is better
    assert table.loc["C", "paper"] == R.NOT_REPORTED and table.loc["C", "status"] == R.NO_PAPER_VALUE
    from scipy import stats
    assert (table.loc["A", "ci_low"], table.loc["A", "ci_high"]) == pytest.approx(
        stats.t.interval(0.95, 1, loc=91.0, scale=math.sqrt(2) / math.sqrt(2)))
    assert table.loc["A", "n"] == 2 and math.isnan(table.loc["C", "ci_low"])
    full = R.build_table(ref, store.records(), "t1", include_not_run=True).set_index("row")
    assert full.loc["B", "status"] == R.NOT_RUN and full.loc["B", "reproduced"] == R.NOT_RUN
    csv, md = store.save_table(table.reset_index(), "t1")
    assert md.read_text().splitlines()[0].startswith("| row | dataset |")
    assert csv.read_text().count("\n") == 5


def test_units_column_counts_the_per_sample_units_behind_each_row(tmp_path):
    store = _store(tmp_path, profile="cpu")
    # row A: seed 0 scored cases a, b, c and seed 1 cases a, b, d (4 units); its metric m2 only cases a and b
    lines = pd.DataFrame({"seed": [0, 0, 0, 1, 1, 1, 0, 0, 1, 1], "unit": list("abcabdabab"),
                          "metric": ["m1"] * 6 + ["m2"] * 4, "value": [1.0, 2, 3, 4, 5, 6, 1, 1, 3, 3]})
    name = store.write_samples("t1", "synthetic", "A", lines)
    ref = S.SamplesRef(name, S.MEAN)
    config = {"folds": 5}
    for metric, values in (("m1", [2.0, 5.0]), ("m2", [1.0, 3.0])):
        store.record("t1", "A", metric, values, dataset="synthetic", dataset_checksum="-", config=config,
                     samples=ref)
    store.record("t1", "B", "m1", [1.0, 2.0], dataset="synthetic", dataset_checksum="-", config=config)
    reference = _reference(tmp_path, [], reported={"t1": {"A": {"m1": R.NOT_REPORTED}}})
    table = R.build_table(reference, store.records(), "t1", samples_of=store.samples).set_index(["row", "metric"])
    assert table["units"].to_dict() == {("A", "m1"): 4, ("A", "m2"): 2, ("B", "m1"): ""}  # B keeps no outputs
    assert R.build_table(reference, store.records(), "t1")["units"].tolist() == ["", "", ""]  # none looked up
    assert R.protocol_note(store.records(), "t1").startswith("Protocol (from the records): 5-fold "
                                                            "cross-validation; seeds 0, 1.")
    assert R.protocol_note(store.records(), "t2") == ""


def test_tables_command_rebuilds_every_table_of_a_paper_from_its_records(tmp_path, capsys):
    from mdbench.cli import main

    store = R.ResultStore("quickstart", "cpu", root=tmp_path)
    lines = pd.DataFrame({"seed": 0, "unit": S.repeat_units(3), "metric": "latency_ms", "value": [2.0, 1.0, 9.0]})
    name = store.write_samples("efficiency", "d", "pytorch", lines)
    store.record("efficiency", "pytorch", "latency_ms", [2.0], dataset="d", dataset_checksum="-", config={},
                 samples=S.SamplesRef(name, S.MEDIAN))
    store.record("table1", "trained", "accuracy", [90.0, 92.0], dataset="d", dataset_checksum="-", config={})
    assert main(["tables", "--paper", "quickstart", "--results-dir", str(tmp_path)]) == 0
    assert "quickstart (cpu): table1 (1 lines), efficiency (1 lines)" in capsys.readouterr().out
    efficiency = pd.read_csv(store.dir / "efficiency.csv")
    assert efficiency[["row", "reproduced", "units"]].values.tolist() == [["pytorch", "2.000 (n=1)", 3]]
    assert pd.read_csv(store.dir / "table1.csv")["units"].isna().all()  # no per-sample outputs: empty
    assert (store.dir / "table1.md").read_text().endswith("\nProtocol (from the records): seeds 0, 1. n: seeds "
                                                          "behind a row; units: its test cases, images, bags or "
                                                          "timing repeats.\n")
    assert main(["tables", "--profile", "gpu", "--results-dir", str(tmp_path)]) == 2  # no records there
    assert main(["tables", "--paper", "no_such_paper", "--results-dir", str(tmp_path)]) == 2
    assert "unknown paper 'no_such_paper'" in capsys.readouterr().err


def test_smoke_rows_are_not_compared_with_the_paper(tmp_path):
    store = _store(tmp_path, profile="smoke")
    _write(store, "A", "acc", [10.0])
    ref = _reference(tmp_path, [], reported={"t1": {"A": {"acc": 91.5}}}, tolerance={"t1": 1.0})
    assert R.build_table(ref, store.records(), "t1").status.tolist() == [R.SYNTHETIC]


def test_multi_level_columns_are_saved_as_words(tmp_path):
    wide = pd.DataFrame([[90.0, 80.0]], index=pd.Index(["A"], name="row"),
                        columns=pd.MultiIndex.from_tuples([("dsc", "MR"), ("nsd", "MR")]))
    csv, md = _store(tmp_path).save_table(wide.reset_index(), "wide")
    assert md.read_text().splitlines()[0] == "| row | dsc MR | nsd MR |"
    assert csv.read_text().splitlines()[0] == "row,dsc MR,nsd MR"


def test_shipped_references_load():
    papers = known_papers()
    assert papers == ["daft", "efcm", "med_tuning", "quickstart", "rd"]
    for paper in papers:
        ref = R.load_reference(paper)
        assert ref.title and ref.citation and ref.reported and ref.claims, paper


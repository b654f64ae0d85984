"""Reruns beside the reference: run-stamped folders (mdbench.runs, ``reproduce``) and ``mdbench compare``."""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mdbench import cli, compare, runs, verdicts
from mdbench.paper_yaml import PAPERS_DIR
from mdbench.results import Record, ResultStore

from toy_papers import write_notebook, write_paper

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# ------------------------------------------------------------------------------------------- run folders
def test_run_folders_are_stamped_per_profile_and_the_latest_is_found(tmp_path):
    first = runs.new_run_folder("cpu", tmp_path, now=NOW)
    assert first == tmp_path / "20260102T030405Z-cpu" and not first.exists()  # the runner creates it
    (first / "quickstart").mkdir(parents=True)
    second = runs.new_run_folder("cpu", tmp_path, now=NOW)  # same second: told apart
    assert second.name == "20260102T030405Z.2-cpu"
    (second / "quickstart").mkdir(parents=True)
    (tmp_path / "20991231T000000Z-smoke" / "quickstart").mkdir(parents=True)  # newer, but another profile
    (tmp_path / "20991231T000000Z-cpu").mkdir()  # newer, but empty: a run refused before it began
    (tmp_path / "notes-cpu" / "quickstart").mkdir(parents=True)  # not a run folder
    assert runs.run_folders("cpu", tmp_path) == [first, second]
    assert runs.latest_run_folder("cpu", tmp_path) == second
    with pytest.raises(runs.RunsError, match="no earlier run of profile 'gpu'.*--results-dir"):
        runs.latest_run_folder("gpu", tmp_path)


def test_run_folder_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("MDBENCH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(tmp_path / "reference"))

    def chosen(*argv: str) -> Path:
        return cli._run_folder(cli.build_parser().parse_args(["reproduce", "--profile", "smoke", *argv]))

    assert chosen().parent == tmp_path / "runs" and chosen().name.endswith("Z-smoke")
    assert chosen("--update-reference") == tmp_path / "reference"
    assert chosen("--results-dir", str(tmp_path / "mine"), "--update-reference") == tmp_path / "mine"
    with pytest.raises(runs.RunsError):
        chosen("--resume")
    (tmp_path / "runs" / "20260102T030405Z-smoke" / "toy").mkdir(parents=True)
    assert chosen("--resume") == tmp_path / "runs" / "20260102T030405Z-smoke"
    assert cli.main(["reproduce", "--profile", "cpu", "--resume"]) == 2  # said in one line, not a traceback


@pytest.mark.slow
def test_a_rerun_leaves_the_reference_untouched_unless_asked(tmp_path, monkeypatch, capsys):
    reference, runs_root = tmp_path / "reference", tmp_path / "runs"
    monkeypatch.setenv("MDBENCH_RUNS_DIR", str(runs_root))
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(reference))
    reference.mkdir()
    body = ("import os, pathlib\n"
            "out = pathlib.Path(os.environ['MDBENCH_RESULTS_DIR']) / 'toy' / 'smoke'\n"
            "out.mkdir(parents=True, exist_ok=True)\n"
            "with open(out / 'ran.txt', 'a') as f: f.write('ran\\n')")
    params = "profile = 'smoke'\ndevice = 'cpu'\nresume = False"
    papers = write_paper(tmp_path / "papers", write_notebook(tmp_path / "toy.ipynb", body, params))
    argv = ["reproduce", "--profile", "smoke", "--quiet", "--papers-dir", str(papers)]

    assert cli.main(argv) == 0
    [run] = runs.run_folders("smoke", runs_root)
    assert (run / "toy" / "smoke" / "ran.txt").read_text() == "ran\n"
    assert list(reference.iterdir()) == []
    out = capsys.readouterr().out
    assert f"outputs of this run: {run}" in out and f"mdbench compare {reference} {run}" in out

    assert cli.main([*argv, "--resume"]) == 0  # continues the latest run folder, makes no new one
    assert runs.run_folders("smoke", runs_root) == [run]
    assert (run / "toy" / "smoke" / "ran.txt").read_text() == "ran\nran\n"

    assert cli.main([*argv, "--update-reference"]) == 0
    assert (reference / "toy" / "smoke" / "ran.txt").read_text() == "ran\n"
    assert "(the reference results)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- compare
CHECKSUM = "0" * 64


def write_results(root: Path, trained: float = 90.0, latency: float = 1.0, auc: float = 95.0) -> ResultStore:
    """Quickstart records at the smoke profile under ``root`` (three seeds a row) and their judged claims."""
    store = ResultStore("quickstart", "smoke", root=root)
    config = {"model": "small_cnn"}
    for row, accuracy, row_auc in (("untrained", 50.0, 50.0), ("trained", trained, auc)):
        store.record("table1", row, "accuracy", [accuracy - 1, accuracy, accuracy + 1], dataset="synthetic",
                     dataset_checksum=CHECKSUM, config=config, unit="%")
        store.record("table1", row, "auc", [row_auc - 1, row_auc, row_auc + 1], dataset="synthetic",
                     dataset_checksum=CHECKSUM, config=config, unit="%")
    store.record("efficiency", "pytorch", "params", [1000], dataset="synthetic", dataset_checksum=CHECKSUM,
                 config=config)
    store.record("efficiency", "pytorch", "latency_ms", [latency], dataset="synthetic", dataset_checksum=CHECKSUM,
                 config=config, unit="ms")
    verdicts.judge_store(store)
    return store


def test_a_rerun_within_tolerance_agrees_and_latency_is_not_judged(tmp_path, capsys):
    write_results(tmp_path / "ref")
    write_results(tmp_path / "run", trained=92.0, latency=3.0)  # +2.2 % accuracy; latency tripled
    found = compare.compare(tmp_path / "ref", tmp_path / "run")
    status = found.cells.set_index(["table", "row", "metric"])["status"]
    assert status[("table1", "trained", "accuracy")] == compare.AGREES
    assert status[("efficiency", "pytorch", "latency_ms")] == compare.NOT_JUDGED
    assert set(found.claims["status"]) == {compare.AGREES} and len(found.claims) == 2
    assert found.all_agree
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "== quickstart (smoke)" in out and "table table1: 4 agree" in out and "all agree" in out
    assert "latency_ms" in out  # listed, though not judged


def test_a_rerun_that_differs_is_reported_per_cell_and_claim(tmp_path, capsys):
    write_results(tmp_path / "ref")
    write_results(tmp_path / "run", trained=45.0, auc=55.0)  # the trained rows fall below the untrained ones
    (tmp_path / "run" / "quickstart" / "smoke" / "records" / "efficiency__synthetic__pytorch__params.json").unlink()
    found = compare.compare(tmp_path / "ref", tmp_path / "run")
    cells = found.cells.set_index(["table", "row", "metric"])
    assert cells.loc[("table1", "trained", "accuracy"), "status"] == compare.DIFFERS
    assert cells.loc[("table1", "trained", "accuracy"), "relative_diff"] == pytest.approx(-0.5)
    assert cells.loc[("table1", "untrained", "accuracy"), "status"] == compare.AGREES
    assert cells.loc[("efficiency", "pytorch", "params"), "status"] == compare.ONLY_REF
    claims = found.claims.set_index("claim")
    assert claims.loc["training_helps_accuracy", "reference"] == verdicts.HOLDS
    assert claims.loc["training_helps_accuracy", "run"] != verdicts.HOLDS
    assert claims.loc["training_helps_accuracy", "status"] == compare.DIFFERS
    assert not found.all_agree
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "run"), "--paper", "quickstart",
                     "--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "training_helps_accuracy" in out and "only in reference" in out
    # the last line counts what differs apart from what only one side has
    assert out.strip().splitlines()[-1].startswith("4 differ, 1 only in reference: ")  # 2 cells, 2 claims
    # a looser tolerance makes the cells agree, not the claims
    loose = compare.compare(tmp_path / "ref", tmp_path / "run", relative=0.6)
    assert (loose.cells.set_index(["table", "row", "metric"]).loc[("table1", "trained", "accuracy"), "status"]
            == compare.AGREES)


def test_rerun_tolerance_of_paper_yaml_overrides_the_default_per_table(tmp_path):
    write_results(tmp_path / "ref")
    write_results(tmp_path / "run", trained=99.0)  # +10 % accuracy
    papers = tmp_path / "papers"
    (papers / "quickstart").mkdir(parents=True)
    data = yaml.safe_load((PAPERS_DIR / "quickstart" / "paper.yaml").read_text())
    (papers / "quickstart" / "paper.yaml").write_text(yaml.safe_dump({**data, "rerun_tolerance":
                                                                      {"table1": {"relative": 0.15}}}))
    assert compare.rerun_tolerances("quickstart", papers) == {"table1": 0.15}
    assert compare.rerun_tolerances("quickstart") == {}
    strict = compare.compare(tmp_path / "ref", tmp_path / "run")
    loose = compare.compare(tmp_path / "ref", tmp_path / "run", papers_dir=papers)
    key = ("table1", "trained", "accuracy")
    assert strict.cells.set_index(["table", "row", "metric"]).loc[key, "status"] == compare.DIFFERS
    assert loose.cells.set_index(["table", "row", "metric"]).loc[key, "tolerance"] == 0.15
    assert loose.cells.set_index(["table", "row", "metric"]).loc[key, "status"] == compare.AGREES
    (papers / "quickstart" / "paper.yaml").write_text(yaml.safe_dump({**data, "rerun_tolerance": {"table1": 0.15}}))
    with pytest.raises(compare.CompareError, match=r"rerun_tolerance must map tables to \{relative: r\}"):
        compare.rerun_tolerances("quickstart", papers)


def test_compare_refuses_bad_input_with_exit_status_2(tmp_path, capsys):
    write_results(tmp_path / "ref")
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "missing")]) == 2
    assert "the run folder" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "empty")]) == 2
    assert "no records of any paper" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "ref"), "--profile", "cpu"]) == 2
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "ref"), "--paper", "imagenet"]) == 2
    assert "unknown paper 'imagenet'" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "ref"), str(tmp_path / "ref"), "--relative", "-1"]) == 2


def test_machine_dependent_units():
    store_args = dict(paper="p", table="t", row="r", values=[1.0], seeds=[0], dataset="d", dataset_checksum="c",
                      profile="smoke", config={})
    assert compare.machine_dependent(Record(metric="time", unit="min", **store_args))
    assert compare.machine_dependent(Record(metric="throughput", unit="patches/s", **store_args))
    assert compare.machine_dependent(Record(metric="speedup", unit="x", **store_args))
    assert compare.machine_dependent(Record(metric="latency_ms", unit="", **store_args))  # unit left empty
    assert not compare.machine_dependent(Record(metric="dice", unit="%", **store_args))
    assert not compare.machine_dependent(Record(metric="train_memory_mb", unit="MiB", **store_args))
    assert not compare.machine_dependent(Record(metric="params", unit="", **store_args))

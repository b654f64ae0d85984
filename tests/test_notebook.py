"""mdbench.notebook (start, record_frame, tables, finish) and the papers' Config.from_params."""
from __future__ import annotations

import ast
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from mdbench import notebook, results, runner, verdicts
from mdbench.params import NotebookConfig

PAPER_CONFIGS = {"med_tuning": "mdbench.papers.med_tuning.experiment", "efcm": "mdbench.papers.efcm.experiment",
                 "rd": "mdbench.papers.rd.experiment", "daft": "mdbench.papers.daft.experiment",
                 "_template": "mdbench.papers._template.experiment"}


@dataclass(frozen=True)
class Toy(NotebookConfig):
    seeds: tuple[int, ...] = (0,)
    lr: float = 0.1
    data_dir: str | None = None


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)  # a "threads" parameter changes the process' setting
    torch.use_deterministic_algorithms(False)


def notebook_parameters(path: Path) -> dict:
    """The values assigned in the cell tagged ``parameters`` of a notebook, read without running it."""
    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    values = {}
    for node in ast.parse("".join(cell["source"])).body:
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_parameters_are_the_plain_public_values_of_a_namespace():
    namespace = {"profile": "smoke", "seeds": [0, 1], "data_dir": None, "n_cases": {"train": 1}, "In": [""],
                 "Out": {}, "_": 3, "torch": torch, "exit": print}
    assert notebook.parameters(namespace) == {"profile": "smoke", "seeds": [0, 1], "data_dir": None,
                                              "n_cases": {"train": 1}}


def test_config_refuses_an_unknown_key_and_names_it():
    with pytest.raises(ValueError, match=r"has no parameter 'lrr' .*it knows data_dir, lr, seeds"):
        Toy.from_params({"lrr": 0.1})
    config = Toy.from_params({"seeds": [0, 1], "data_dir": "/data"})
    assert config.seeds == (0, 1) and config.lr == 0.1  # lists become tuples; an absent key keeps its default
    assert config.as_record() == {"seeds": (0, 1), "lr": 0.1}  # where the data lies is no part of a record


@pytest.mark.parametrize("paper", sorted(PAPER_CONFIGS))
def test_every_notebook_and_profile_parameter_is_a_field_of_its_papers_config(paper):
    """A parameter the Config does not know would be refused at run time: catch it here, for every profile."""
    config_type = importlib.import_module(PAPER_CONFIGS[paper]).Config
    entry = {e.paper: e for e in runner.load_papers()}.get(paper)  # the template is no paper reproduce runs
    name = entry.notebook.name if entry else f"{paper}.ipynb"
    sets = [notebook_parameters(runner.NOTEBOOKS_DIR / name)]
    if entry:
        sets += [entry.parameters_for(runner.load_profile(p)) for p in runner.available_profiles()]
    for params in sets:
        config_type.from_params({k: v for k, v in params.items() if k not in notebook.SESSION_PARAMS})
    with pytest.raises(ValueError, match="no parameter 'not_a_parameter'"):
        config_type.from_params({"not_a_parameter": 1})


def test_start_seeds_deterministically_and_opens_the_store(results_dir, capsys):
    params = {"profile": "smoke", "threads": 1, "seeds": [3, 4], "lr": 0.5}
    first = notebook.start("quickstart", params, Toy)
    draw = torch.rand(4)
    torch.rand(10)  # whatever ran in between
    second = notebook.start("quickstart", params, Toy)
    assert torch.equal(torch.rand(4), draw)
    assert first.config == Toy(seeds=(3, 4), lr=0.5) and second.deterministic and torch.get_num_threads() == 1
    assert torch.are_deterministic_algorithms_enabled()
    assert first.store.dir == results_dir / "quickstart" / "smoke"
    assert "threads" in capsys.readouterr().out.splitlines()[0]
    assert not notebook.start("quickstart", {"profile": "gpu"}).deterministic


def test_record_frame_writes_one_record_per_row_and_metric_in_seed_order(results_dir):
    session = notebook.start("quickstart", {"profile": "smoke"})
    frame = pd.DataFrame({"row": ["a", "a", "b"], "metric": "acc", "seed": [2, 0, 0], "value": [1.0, 3.0, 5.0],
                          "unit": ["%", "%", "s"]})
    session.record_frame("t", frame, dataset="toy", dataset_checksum="-", config={"k": 1})
    by_row = {r.row: r for r in session.store.records()}
    assert by_row["a"].values == [1.0, 3.0] and by_row["a"].seeds == [2, 0] and by_row["b"].unit == "s"
    assert set(by_row) == {"a", "b"} and by_row["a"].config == {"k": 1} and by_row["a"].dataset == "toy"
    with pytest.raises(ValueError, match="needs a dataset_checksum"):
        session.record_frame("t", frame, dataset="toy", config={})
    with pytest.raises(ValueError, match=r"\['value'\] missing"):
        session.record_frame("t", frame.drop(columns="value"), dataset="toy", dataset_checksum="-", config={})


def _quickstart_records(session: notebook.Session) -> None:
    frame = pd.DataFrame({"row": ["untrained"] * 2 + ["trained"] * 2, "metric": "accuracy", "seed": [0, 1] * 2,
                          "value": [50.0, 52.0, 90.0, 94.0]})
    session.record_frame("table1", pd.concat([frame, frame.assign(metric="auc")]), dataset="synthetic",
                         dataset_checksum="-", config={}, unit="%")


def test_finish_judges_the_claims_from_the_records_and_saves_them(results_dir, capsys):
    session = notebook.start("quickstart", {"profile": "smoke"})
    _quickstart_records(session)
    tables = session.tables()
    claims = notebook.finish(session)
    reference = results.load_reference("quickstart")
    expected = verdicts.evaluate_claims(reference, session.store.records(), session.store.samples)
    pd.testing.assert_frame_equal(claims, expected)
    saved = pd.read_csv(session.store.dir / "claims.csv")
    assert saved.status.tolist() == expected.status.tolist()
    assert (session.store.dir / "table1.csv").exists() and len(tables["table1"]) == 4
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith(f"{len(expected)} claim checks run")
    assert all(line.startswith(f"[{status}]") for line, status in zip(printed[1:-1], expected.status, strict=True))


def test_finish_leaves_the_last_claims_intact_when_a_write_fails(results_dir, monkeypatch):
    session = notebook.start("quickstart", {"profile": "smoke"})
    _quickstart_records(session)
    notebook.finish(session)
    before = (session.store.dir / "claims.csv").read_text()

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        notebook.finish(session)
    assert (session.store.dir / "claims.csv").read_text() == before
    assert not list(session.store.dir.glob(".tmp-*"))


def test_claims_on_wall_clock_times_are_marked():
    claims = pd.DataFrame([{"claim": "fast", "text": "x is faster", "dataset": "d", "lhs": "1.00 ± 0.10 (n=3)",
                            "rhs": "2.00 ± 0.10 (n=3)", "test": "paired t over 3 seeds", "n": 3, "difference": -1.0,
                            "ci_low": -1.5, "ci_high": -0.5, "confidence": 0.95, "p": 0.01, "p_adj": 0.01,
                            "status": "holds"},
                           {"claim": "acc", "text": "x is better", "dataset": "d", "lhs": "not run",
                            "rhs": "1.00 (n=1)", "test": "—", "n": 0, "difference": float("nan"),
                            "ci_low": float("nan"), "ci_high": float("nan"), "confidence": float("nan"),
                            "p": float("nan"), "p_adj": float("nan"), "status": "not run"}])
    lines = verdicts.claim_lines(claims, {"fast"})
    assert lines == ["[holds] x is faster (d): d = -1.00 [-1.50, -0.50] at 95.0 % (BH-adjusted), p_adj = 0.010, "
                     f"paired t over 3 seeds {verdicts.WALL_CLOCK_NOTE}",
                     "1 claim checks run (1 holds); 1 not run at this profile"]


@pytest.mark.parametrize("folder", sorted(p.parent for p in (runner.REPO_ROOT / "results").glob("*/cpu/claims.csv")),
                         ids=lambda p: p.parent.name)
def test_committed_real_data_claims_follow_from_their_records(folder):
    """The committed results still load: their records, judged with today's paper.yaml, give their claims.csv."""
    store = results.ResultStore(folder.parent.name, "cpu", root=folder.parents[1])
    claims = verdicts.evaluate_claims(results.load_reference(folder.parent.name), store.records(), store.samples)
    committed = pd.read_csv(folder / "claims.csv")
    pd.testing.assert_frame_equal(claims, committed, check_dtype=False)


@pytest.mark.parametrize("folder", sorted(p.parent for p in (runner.REPO_ROOT / "results").glob("*/*/claims.csv")),
                         ids=lambda p: f"{p.parent.name}-{p.name}")
def test_committed_real_data_tables_follow_from_their_records(folder):
    """Every committed table of a paper is what `mdbench tables` builds from its records and outputs today; a table
    the run made no record of (its notebook gained the table later) is not there."""
    store = results.ResultStore(folder.parent.name, folder.name, root=folder.parents[1])
    reference, records = results.load_reference(folder.parent.name), store.records()
    recorded = {record.table for record in records}
    for name, digits in reference.tables.items():
        if name not in recorded:
            assert not (folder / f"{name}.csv").exists(), f"{name}.csv without records"
            continue
        built = results.build_table(reference, records, name, digits=digits, samples_of=store.samples)
        assert built.to_csv(index=False) == (folder / f"{name}.csv").read_text(), name

"""The cross-paper Pareto (mdbench/pareto.py): the frontier on known points, human labels, its files, bad input
refused, and the committed figure made from the committed records."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mdbench import cli, figures, pareto  # noqa: E402
from mdbench.results import ResultStore, results_root  # noqa: E402


def test_the_frontier_of_known_points():
    cost = [1.0, 2.0, 3.0, 2.0, 4.0, np.nan, 0.5]
    score = [50.0, 60.0, 55.0, 60.0, 70.0, 99.0, 40.0]
    # 3.0/55 is dominated by 2.0/60; the two 2.0/60 tie and stay; NaN never counts
    assert pareto.frontier(cost, score).tolist() == [True, True, False, True, True, False, True]
    assert pareto.frontier([1.0, 2.0], [5.0, 1.0], higher_is_better=False).tolist() == [True, True]
    assert pareto.frontier([1.0, 2.0], [1.0, 5.0], higher_is_better=False).tolist() == [True, False]
    with pytest.raises(ValueError, match="1-D"):
        pareto.frontier([1.0, 2.0], [1.0])


SPEC = """\
paper: {paper}
names: {{big: "Big model", small_ft: "Small, fine-tuned", small_kd: "Small, distilled", m_small: "M-Small",
         m_big: "M-Big"}}
pareto:
  metric: {{table: t1, metric: auc, datasets: [a, b], label: "AUC (%)"}}
  input: "one 8×8 image"
  axes:
    params_m: {{table: t2, dataset: cost, metric: params_m}}
    latency_ms: {{table: t2, dataset: cost, metric: seconds, scale: 1000}}
  deployed:
    default: "{{model}}"
    big: m_big
"""


@pytest.fixture
def papers(tmp_path):
    """A paper ``toy`` with records: three methods on two datasets, two deployed models."""
    papers_dir, root = tmp_path / "papers", tmp_path / "results"
    (papers_dir / "toy").mkdir(parents=True)
    (papers_dir / "toy" / "paper.yaml").write_text(SPEC.format(paper="toy"))
    store = ResultStore("toy", "cpu", root=root)
    for method, model, aucs in (("big", "m_big", (90, 80)), ("small_ft", "m_small", (70, 60)),
                                ("small_kd", "m_small", (80, 70))):
        for dataset, auc in zip(("a", "b"), aucs, strict=True):
            store.record("t1", method, "auc", [auc], dataset=dataset, dataset_checksum="x",
                         config={"model": model})
    for model, params, seconds in (("m_big", 10.0, 2.0), ("m_small", 1.0, 0.5)):
        store.record("t2", model, "params_m", [params], dataset="cost", dataset_checksum="x", config={})
        store.record("t2", model, "seconds", [seconds], dataset="cost", dataset_checksum="x", config={})
    return papers_dir, root


def test_points_come_from_the_records_with_human_names(papers):
    papers_dir, root = papers
    points = pareto.build(["toy"], "cpu", root, papers_dir).set_index("method")
    assert points.loc["small_kd", "metric"] == 75.0 and points.loc["big", "metric"] == 85.0
    assert points.loc["small_kd", "latency_ms"] == 500.0 and np.isnan(points.loc["big", "gflops"])
    assert points.loc["small_kd", "name"] == "Small, distilled" and points.loc["big", "deployed"] == "m_big"
    assert points.frontier_params_m.to_dict() == {"big": True, "small_ft": False, "small_kd": True}
    assert not points.frontier_gflops.any()  # no FLOPs recorded: no frontier on them


def test_the_figure_and_csv_are_written(papers, tmp_path):
    papers_dir, root = papers
    points = pareto.build(["toy"], "cpu", root, papers_dir)
    paths = pareto.write(points, tmp_path / "out", "pareto_cpu")
    assert sorted(p.name for p in paths) == ["pareto_cpu.csv", "pareto_cpu.png", "pareto_cpu.svg"]
    svg = (tmp_path / "out" / "pareto_cpu.svg").read_text()
    assert "Small, distilled" in svg and "small_kd" not in svg  # labels are human names, not keys
    assert "not recorded" in svg  # the FLOPs panel says why it is empty
    assert pd.read_csv(tmp_path / "out" / "pareto_cpu.csv").method.tolist() == ["big", "small_ft", "small_kd"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.replace("    big: m_big\n", "").replace('    default: "{model}"\n', ""), "names no model"),
    (lambda s: s.replace('default: "{model}"', 'default: "{size}"'), "needs 'size'"),
    (lambda s: s.replace("datasets: [a, b]", "datasets: [a, c]"), r"no auc record on \['c'\]"),
    (lambda s: s.replace("params_m: {table", "watts: {table"), "pareto.axes has"),
    (lambda s: s.replace("  input: \"one 8×8 image\"\n", ""), "lacks or mistypes 'input'"),
    (lambda s: s.replace("big: m_big", "big: m_huge"), "no record t2/cost/m_huge"),
])
def test_bad_input_is_refused(papers, edit, message):
    papers_dir, root = papers
    path = papers_dir / "toy" / "paper.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(pareto.ParetoError, match=message):
        pareto.build(["toy"], "cpu", root, papers_dir)


def test_a_paper_without_records_or_section_is_refused(papers, tmp_path):
    papers_dir, _ = papers
    with pytest.raises(pareto.ParetoError, match="no records of toy"):
        pareto.build(["toy"], "cpu", tmp_path / "empty", papers_dir)
    (papers_dir / "bare").mkdir()
    (papers_dir / "bare" / "paper.yaml").write_text("paper: bare\n")
    with pytest.raises(pareto.ParetoError, match="no pareto section"):
        pareto.build(["bare"], "cpu", tmp_path, papers_dir)
    with pytest.raises(pareto.ParetoError, match="no Pareto points"):
        pareto.plot(pd.DataFrame(columns=pareto.COLUMNS))


def test_the_committed_pareto_matches_the_committed_records():
    committed = results_root() / pareto.OUT_DIR / "pareto_cpu.csv"
    fresh = pareto.build(profile="cpu")
    assert committed.read_text() == pareto.csv_text(fresh), "rerun `mdbench figures` and commit results/pareto/"
    for paper, mine in fresh.groupby("paper"):
        assert figures.missing_names(figures.method_names(str(paper)), mine.method) == []
    assert set(fresh.paper) == {"efcm", "daft", "med_tuning", "rd"}


def test_the_figures_command_regenerates_from_records(papers, capsys):
    papers_dir, root = papers
    argv = ["figures", "--results-dir", str(root), "--papers-dir", str(papers_dir)]
    assert cli.main([*argv, "--paper", "toy"]) == 0
    assert "pareto_costs.svg" in capsys.readouterr().out
    assert (root / "toy" / "cpu" / "pareto_costs.png").exists() and not (root / pareto.OUT_DIR).exists()
    assert cli.main(argv) == 0  # every paper: the cross-paper figure too
    assert sorted(p.name for p in (root / pareto.OUT_DIR).iterdir()) == [
        "pareto_cpu.csv", "pareto_cpu.png", "pareto_cpu.svg"]
    assert cli.main([*argv, "--paper", "nosuch"]) == 2
    assert "unknown paper 'nosuch'" in capsys.readouterr().err


def test_the_figures_command_says_why_it_draws_no_pareto_and_goes_on(papers, capsys):
    papers_dir, root = papers
    for cost in (root / "toy" / "cpu" / "records").glob("t2__*"):  # a run made before its paper recorded costs
        cost.unlink()
    argv = ["figures", "--results-dir", str(root), "--papers-dir", str(papers_dir), "--paper", "toy"]
    assert cli.main(argv) == 0
    assert "no Pareto figures at cpu: toy: no record t2/cost/" in capsys.readouterr().err
    assert not (root / "toy" / "cpu" / "pareto_costs.png").exists()


def test_an_axis_not_measured_at_the_profile_is_not_drawn(papers, tmp_path):
    papers_dir, root = papers
    for cost in (root / "toy" / "cpu" / "records").glob("t2__*seconds*"):  # latency timed at another profile only
        cost.unlink()
    points = pareto.build(["toy"], "cpu", root, papers_dir).set_index("method")
    assert points.latency_ms.isna().all() and points.loc["small_kd", "params_m"] == 1.0
    pareto.write(points.reset_index(), tmp_path / "out", "pareto_cpu")
    assert "at this profile" in (tmp_path / "out" / "pareto_cpu.svg").read_text()


def test_a_method_not_run_on_every_dataset_keeps_its_costs_and_is_not_plotted(papers, tmp_path):
    papers_dir, root = papers
    for record in (root / "toy" / "cpu" / "records").glob("t1__b__small_kd__*"):  # small_kd ran on dataset a only
        record.unlink()
    points = pareto.build(["toy"], "cpu", root, papers_dir).set_index("method")
    assert np.isnan(points.loc["small_kd", "metric"]) and points.loc["small_kd", "params_m"] == 1.0
    assert "no auc on b: not plotted" in points.loc["small_kd", "deployed"]
    assert points.frontier_params_m.to_dict() == {"big": True, "small_ft": True, "small_kd": False}
    pareto.write(points.reset_index(), tmp_path / "out", "pareto_cpu")
    assert "not run on every dataset" in (tmp_path / "out" / "pareto_cpu.svg").read_text()

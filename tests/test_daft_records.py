"""DAFT's records and the per-sample lines behind them: Table A's per-case DSC / NSD give back every leaderboard
average per seed (nan scores and unscored modalities included), Table B's seconds and mask agreement per timed case,
the router's outcome per test case and the embedding MSE per KD input; all through ``Session.record_frame``, which
refuses lines that do not give back the recorded values."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdbench import notebook, results, verdicts
from mdbench import samples as S
from mdbench.papers.daft import experiment as daft
from mdbench.papers.daft.deploy import timing
from mdbench.papers.daft.evaluation import case_lines, modality_summary, summary_metrics
from mdbench.papers.daft.routing import GENERAL


class BoxFill:
    """Predictor stand-in: the mask of a box is the box shrunk by ``margin`` px on each side, so that each stand-in
    scores differently; with ``fail_3d`` it cannot embed a 3D slice (a (H, W) image), so its 3D cases are errors."""

    def __init__(self, margin: int, fail_3d: bool = False) -> None:
        self.margin, self.fail_3d = margin, fail_3d

    def embed(self, image: np.ndarray) -> np.ndarray:
        if self.fail_3d and image.ndim == 2:
            raise ValueError("this stand-in segments no volume")
        return image

    def predict_from_embedding(self, embedding, boxes, orig_hw):
        m = self.margin
        masks = np.zeros((len(boxes), *orig_hw), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).astype(int)):
            masks[k, y0 + m:y1 + 1 - m, x0 + m:x1 + 1 - m] = 1
        return masks


def _session(tmp_path) -> notebook.Session:
    return notebook.Session("daft", "smoke", None, results.ResultStore("daft", "smoke", root=tmp_path), True, {})


def _regrouped(session: notebook.Session, table: str) -> dict[tuple[str, str], results.Record]:
    return {(r.row, r.metric): r for r in session.store.records() if r.table == table}


def _aggregated(session: notebook.Session, rec: results.Record) -> list[float]:
    """Each seed's value of ``rec`` again, from its per-sample lines alone."""
    lines = session.store.samples(rec)
    assert lines is not None, f"{rec.row} {rec.metric} has no per-sample lines"
    return [S.aggregate(lines[lines.seed == seed], rec.samples_ref, rec.metric) for seed in rec.seeds]


def test_case_lines_give_back_the_leaderboard_average_by_hand():
    # A: two cases (one nsd nan), B: one case, C: only an unscored case, D: a dsc but no nsd at all
    frame = pd.DataFrame({"case": ["a1", "a2", "b1", "c1", "d1"], "modality": ["A", "A", "B", "C", "D"],
                          "dsc": [80.0, 60.0, 30.0, np.nan, 50.0], "nsd": [70.0, np.nan, 40.0, np.nan, np.nan],
                          "error": ["", "", "", "unreadable", ""]})
    summary = summary_metrics(modality_summary(frame))
    assert summary["dsc_average"] == pytest.approx((70 + 30 + 50) / 3)
    assert summary["nsd_average"] == pytest.approx((70 + 40) / 2) and np.isnan(summary["nsd_D"])
    lines = case_lines(frame)
    assert "c1" not in set(lines.unit) and not lines.metric.isin(["nsd_D", "dsc_C"]).any()
    nsd = lines[lines.metric == "nsd_average"].set_index("unit").weight
    assert nsd.to_dict() == pytest.approx({"a1": 1 / 2, "b1": 1 / 2})  # 1 / (2 modalities x 1 case with an nsd)
    dsc = lines[lines.metric == "dsc_average"].set_index("unit").weight
    assert dsc.to_dict() == pytest.approx({"a1": 1 / 6, "a2": 1 / 6, "b1": 1 / 3, "d1": 1 / 3})
    for metric, value in summary.items():
        if not np.isnan(value):
            own = lines[lines.metric == metric]
            assert np.average(own.value, weights=own.weight) == pytest.approx(value, rel=1e-12)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Table A of two seeds on tiny synthetic cases of four modalities, stand-in models: the 3D expert fails (the
    DAFT rows have no score of the volume modality) and the LiteMedSAM row is scored once."""
    cfg = daft.Config(dataset="synthetic", seeds=(0, 1), n_cases={"train": 1, "val": 1, "test": 2},
                      synthetic_image_size=(64, 64), synthetic_volume_shape=(8, 32, 32))
    cases = daft.load_data(cfg, tmp_path_factory.mktemp("daft_cases"))
    routers = daft.fit_routers(cases, cfg)
    by_seed = {}
    for seed in cfg.seeds:
        models = {"KD only": BoxFill(3 + seed), "+ general FT": BoxFill(1 + seed),
                  "experts": {"Endoscopy": BoxFill(0), "Dermoscopy": BoxFill(seed), "3D": BoxFill(0, True)}}
        per_case, evaluator = daft.evaluate_seed(models, routers, cases, seed)
        by_seed[seed] = daft.Lineage({}, [], per_case, evaluator.predictions)
    lineages = daft.Lineages(by_seed, {"stand-ins": True})
    table = daft.run(BoxFill(2), lineages, cases, cfg)
    return cfg, cases, routers, lineages, table


def test_table_a_per_case_lines_give_back_every_record_per_seed(run, tmp_path):
    cfg, cases, _, lineages, table = run
    per_case = table.per_case.copy()
    us = (per_case.row == "KD only") & (per_case.seed == 1) & (per_case.modality == "US")
    per_case.loc[us, "nsd"] = np.nan  # no NSD of one modality: that row and seed records no nsd_US
    endoscopy = per_case.index[(per_case.row == "+ general FT") & (per_case.modality == "Endoscopy")]
    per_case.loc[endoscopy[0], "nsd"] = np.nan  # one NSD of two: its modality weighs as much as the others
    table = daft.TableA(per_case, table.predictions)
    records, lines = daft.record_table_a(table, lineages, cases)
    session = _session(tmp_path)
    session.record_frame("table_a", records, dataset=cases.name, dataset_checksum=cases.checksum, samples=lines)

    recorded = _regrouped(session, "table_a")
    for (row, seed), frame in per_case.groupby(["row", "seed"]):
        expected = {m: v for m, v in summary_metrics(modality_summary(frame)).items() if not np.isnan(v)}
        got = {metric: rec.values[rec.seeds.index(seed)] for (r, metric), rec in recorded.items()
               if r == row and seed in rec.seeds}
        assert got == pytest.approx(expected, rel=1e-12), (row, seed)
    assert recorded[("KD only", "nsd_US")].seeds == [0] and recorded[("KD only", "dsc_US")].seeds == [0, 1]
    assert ("+ DAFT (file-name router)", "dsc_MR") not in recorded  # every volume failed: no modality MR
    assert recorded[("LiteMedSAM", "dsc_average")].seeds == [cfg.seeds[0]]
    for rec in recorded.values():
        assert _aggregated(session, rec) == pytest.approx(rec.values, rel=1e-9), (rec.row, rec.metric)

    names = {c["name"] for c in cases.test}
    volumes = {c["name"] for c in cases.test if c["dims"] == 3}
    for seed in cfg.seeds:  # one unit id per test case, the same in every row of a seed
        units = {row: set(group.unit) for row, group in lines[lines.seed == seed].groupby("row")}
        assert units["KD only"] == units["+ general FT"] == names
        assert units["+ DAFT (file-name router)"] == names - volumes
    # the claims judge pairs two fully scored rows case by case, not seed by seed
    claims = verdicts.evaluate_claims(results.load_reference("daft"), session.store.records(), session.store.samples)
    assert claims.set_index("claim").loc["general_beats_kd", "test"].startswith(f"paired t over {len(names)} units")


def test_record_table_a_refuses_nothing_it_did_not_compute(run, tmp_path):
    # the lines are the data of the records: one changed score and record_frame refuses them
    _, cases, _, lineages, table = run
    records, lines = daft.record_table_a(table, lineages, cases)
    lines.loc[lines.index[0], "value"] += 1.0
    with pytest.raises(S.SamplesError, match="per-sample outputs give"):
        _session(tmp_path).record_frame("table_a", records, dataset=cases.name, dataset_checksum=cases.checksum,
                                        samples=lines)


def test_router_outcomes_per_case_give_back_its_scores(run, tmp_path):
    cfg, cases, routers, _, _ = run
    records, lines = daft.record_routers(routers, cfg)
    session = _session(tmp_path)
    session.record_frame("router", records, dataset=cases.name, dataset_checksum=cases.checksum, unit="%",
                         samples=lines)
    seen = [n for n, e in routers.oracle.items() if e != GENERAL]
    unseen = [n for n, e in routers.oracle.items() if e == GENERAL]
    assert seen and unseen
    by_hand = {"accuracy": np.mean([routers.routes[n] == e for n, e in routers.oracle.items()]),
               "accuracy_seen": np.mean([routers.routes[n] == routers.oracle[n] for n in seen]),
               "fallback_unseen": np.mean([routers.routes[n] == GENERAL for n in unseen])}
    recorded = _regrouped(session, "router")
    assert {m: rec.values[0] for (_, m), rec in recorded.items()} == pytest.approx(
        {m: 100 * v for m, v in by_hand.items()}, rel=1e-12)
    for rec in recorded.values():
        assert _aggregated(session, rec) == pytest.approx(rec.values, rel=1e-9)
    assert set(lines[lines.metric == "accuracy"].unit) == {c["name"] for c in cases.test}


def test_table_b_seconds_and_mask_agreement_per_timed_case(run, tmp_path):
    cfg, cases, routers, _, table = run
    timed = [c for c in cases.test if c["modality"] in ("Endoscopy", "US")][:2]
    stages = timing.table_b_stages()
    predictions = table.predictions[cfg.seeds[0]]
    rows = []
    for i, stage in enumerate(stages):
        for k, case in enumerate(timed):
            segs = predictions[(routers.file_name.route(case["name"]), case["name"])].copy()
            if k == 1:
                segs[: len(segs) // 2] = 0 if segs.max() else 1  # half of the deployed mask differs, or none
            out = tmp_path / f"{i}_{case['name']}"
            np.savez(out, segs=segs)
            rows.append({"case": case["name"], "stage": stage.name, "seconds": 10.0 / (i + 1) + k, "dims": 2,
                         "output": str(out)})
    frame = pd.DataFrame(rows)
    timings = daft.Timings(frame, frame.groupby("stage", sort=False).seconds.mean(), threads=1)
    records, lines = daft.record_table_b(timings, table, routers, timed, cfg, "test cpu")
    session = _session(tmp_path)
    session.record_frame("table_b", records, dataset=cases.name, dataset_checksum=cases.checksum, samples=lines)
    recorded = _regrouped(session, "table_b")
    assert recorded[(stages[0].name, "seconds_per_case")].values == [pytest.approx(10.5)]
    assert recorded[(stages[1].name, "speedup")].values == [pytest.approx(10.5 / 5.5)]
    assert recorded[(stages[1].name, "speedup")].samples is None  # a ratio of means: no per-case lines
    for (row, metric), rec in recorded.items():
        if metric != "speedup":
            assert _aggregated(session, rec) == pytest.approx(rec.values, rel=1e-9), (row, metric)
    agreement = lines[lines.metric == "mask_agreement"].set_index("unit").value
    assert agreement[timed[0]["name"]] == 100.0 and agreement[timed[1]["name"]] < 100.0
    assert set(lines[lines.metric == "seconds_per_case"].unit) == {c["name"] for c in timed}


def test_kd_mse_per_input_gives_back_the_recorded_mse(tmp_path):
    units = ["2DBox_US_a.npz", "3DBox_MR_b.npz@z2", "3DBox_MR_b.npz@z4"]
    kd_mse = {"before KD": {0: np.array([0.5, 0.25, 0.75]), 1: np.array([0.4, 0.2, 0.3])},
              "after KD": {0: np.array([0.1, 0.05, 0.15]), 1: np.array([0.2, 0.1, 0.0])}}
    by_seed = {seed: daft.Lineage({row: kd_mse[row][seed] for row in kd_mse}, [], pd.DataFrame()) for seed in (0, 1)}
    lineages = daft.Lineages(by_seed, {"epochs": 1}, kd_units=units)
    records, lines = daft.record_kd(lineages)
    session = _session(tmp_path)
    session.record_frame("kd", records, dataset="synthetic", dataset_checksum="x", samples=lines)
    recorded = _regrouped(session, "kd")
    assert recorded[("before KD", "embedding_mse")].values == pytest.approx([0.5, 0.3])
    assert recorded[("after KD", "embedding_mse")].values == pytest.approx([0.1, 0.1])
    for rec in recorded.values():
        assert rec.seeds == [0, 1] and _aggregated(session, rec) == pytest.approx(rec.values, rel=1e-9)
    assert set(lines.unit) == set(units)

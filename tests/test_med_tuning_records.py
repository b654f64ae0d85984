"""Med-Tuning's records and the per-volume outputs behind them: per-volume values by hand (nan classes dropped as
the aggregate drops them), and a tiny synthetic run whose per-volume outputs give back every record, on the same
test volumes in every row of a seed."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mdbench import notebook, results
from mdbench import samples as S
from mdbench.papers.med_tuning import experiment as mt

NAN = math.nan


def test_per_volume_values_drop_unscored_classes_and_weight_by_the_classes_scored():
    dice = np.array([[80.0, 60.0], [NAN, 40.0], [NAN, NAN]])  # %: volume b lacks anterior, c both classes
    hd = np.array([[2.0, 4.0], [NAN, 6.0], [NAN, NAN]])  # mm
    lines = mt.per_volume_lines(["a", "b", "c"], dice, hd).set_index(["metric", "unit"])
    assert lines.loc["dice_anterior"].index.tolist() == ["a"]  # b and c score no anterior: no line
    assert lines.loc["dice_posterior", "value"].tolist() == [60.0, 40.0]
    assert lines.loc["dice_mean", "value"].tolist() == [70.0, 40.0]
    assert lines.loc["dice_mean", "weight"].tolist() == [2, 1]
    assert lines.loc["hd95", "value"].tolist() == [3.0, 6.0]
    means = mt.volume_means(lines.reset_index())
    # the mean over every scored (volume, class) pair, as np.nanmean over the (N, 2) scores
    assert means == {"dice_anterior": 80.0, "dice_posterior": 50.0, "dice_mean": 60.0, "hd95": 4.0}
    assert means["hd95"] == np.nanmean(hd)
    assert math.isnan(mt.volume_means(mt.per_volume_lines(["c"], dice[2:], hd[2:]))["hd95"])


def test_failed_runs_are_those_with_a_class_under_the_line():
    def lines(row, seed, fold, anterior, posterior):  # two test volumes per run
        dice = np.array([[anterior, posterior]] * 2)
        return mt.per_volume_lines(["a", "b"], dice, np.ones((2, 2))).assign(row=row, seed=seed, fold=fold)

    per_volume = pd.concat([lines("full", 0, 0, 85.0, 84.0), lines("full", 0, 1, 0.0, 85.0),
                            lines("scratch_unet3d", 0, 0, 9.9, 80.0), lines("head", 0, 0, NAN, 83.0)],
                           ignore_index=True)
    by_run = mt.class_dice_by_run(per_volume)
    assert by_run.columns.tolist() == ["dice_anterior", "dice_posterior"]
    assert len(by_run) == 4 and by_run.loc[("full", 0, 1), "dice_anterior"] == 0.0
    failed = mt.failed_runs(by_run)
    # a class no test volume has (nan) is not a failure; 9.9 % is under the 10 % line
    assert failed.index.tolist() == [("full", 0, 1), ("scratch_unet3d", 0, 0)]
    assert mt.failed_runs(by_run, below=5.0).index.tolist() == [("full", 0, 1)]
    with pytest.raises(ValueError, match=r"lack the columns \['fold', 'row', 'seed'\]"):
        mt.class_dice_by_run(per_volume.drop(columns=["row", "seed", "fold"]))


@pytest.fixture(scope="module")
def tiny_run():
    """Two rows over two seeds on three synthetic test volumes (one epoch: outputs, not quality, are tested)."""
    cfg = mt.Config(backbone="timm:vit_tiny_patch16_224", pretrained=False, image_size=16, num_slices=8,
                    backbone_kwargs={"patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 2},
                    decoder_channels=8, unet_channels=(4, 8), epochs=1, batch_size=1)
    volumes = mt.Volumes.concat([mt.load_volumes("synthetic", "train", 2, cfg),
                                 mt.load_volumes("synthetic", "test", 3, cfg)])
    rows = {row: mt.run(row, cfg, volumes, [0, 1]) for row in ("scratch_unet3d", "med_tuning")}
    return volumes, rows


def test_per_volume_outputs_give_back_every_record_on_shared_volumes(tiny_run, tmp_path):
    volumes, rows = tiny_run
    session = notebook.Session("med_tuning", "smoke", None, results.ResultStore("med_tuning", "smoke", root=tmp_path),
                               True, {})
    for result in rows.values():
        session.record_frame("table1", mt.record(result, volumes, {"row": result.row}), samples=result.per_volume)
    session.record_frame("table2", mt.record(rows["med_tuning"].subset([1]), volumes, {}, mt.TABLE2_METRICS),
                         samples=rows["med_tuning"].subset([1]).per_volume)
    records = session.store.records()
    assert len(records) == 2 * len(mt.UNITS) + len(mt.TABLE2_METRICS)
    units = {}
    for rec in records:
        frame = session.store.samples(rec)
        if rec.metric not in mt.PER_VOLUME:  # parameters, memory, seconds: no per-volume values
            assert frame is None
            continue
        assert rec.samples_ref.aggregate == S.MEAN
        for seed, value in zip(rec.seeds, rec.values, strict=True):
            own = frame[frame["seed"] == seed]
            assert S.aggregate(own, rec.samples_ref, rec.metric) == pytest.approx(value, rel=1e-12)
            units.setdefault(seed, set()).add(tuple(own.loc[own["metric"] == rec.metric, "unit"]))
    assert {rec.seeds[0] for rec in records if rec.table == "table2"} == {1}
    # every row and metric of a seed scored the same volumes, the test ones, named by their ids
    tested = tuple(volumes.parts()["test"].ids)
    assert units == {0: {tested}, 1: {tested}}


def test_a_record_that_its_volumes_do_not_give_back_is_refused(tiny_run, tmp_path):
    volumes, rows = tiny_run
    result = rows["med_tuning"]
    session = notebook.Session("med_tuning", "smoke", None, results.ResultStore("med_tuning", "smoke", root=tmp_path),
                               True, {})
    lines = result.per_volume.copy()
    lines.loc[(lines["seed"] == 0) & (lines["metric"] == "hd95"), "value"] += 1.0
    with pytest.raises(S.SamplesError, match="hd95, seed 0"):
        session.record_frame("table1", mt.record(result, volumes, {}), samples=lines)



def test_deployment_costs_count_the_frozen_backbone_and_their_records_give_back_the_median(tmp_path):
    cfg = mt.Config(backbone="timm:vit_tiny_patch16_224", pretrained=False, image_size=16, num_slices=4,
                    backbone_kwargs={"patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 2},
                    decoder_channels=8, unet_channels=(4, 8), latency_repeats=3)
    costs = mt.deployment_costs(cfg, ["full", "head", "med_tuning"]).set_index("model")
    # what a row deploys does not shrink with what it trains: head-only tuning carries the whole full model
    every_parameter = sum(p.numel() for p in mt.build_row_model("full", cfg).parameters())
    assert costs.loc["full", "params"] == costs.loc["head", "params"] == every_parameter
    assert costs.loc["med_tuning", "params"] > every_parameter  # the adapters come on top
    assert costs.loc["med_tuning", "flops"] > costs.loc["head", "flops"] > 0
    assert (costs.input_shape == "1x1x4x16x16").all() and costs.latency_times_ms.map(len).eq(3).all()
    session = notebook.Session("med_tuning", "smoke", None, results.ResultStore("med_tuning", "smoke", root=tmp_path),
                               True, {})
    deployment, repeats = mt.record_costs(costs.reset_index(), cfg)
    session.record_frame("deployment", deployment, samples=repeats, aggregate="median")
    by_key = {(r.row, r.metric): r for r in session.store.records()}
    assert by_key["med_tuning", "params_m"].values == [pytest.approx(costs.loc["med_tuning", "params"] / 1e6)]
    assert by_key["head", "latency_ms"].unit == "ms"
    assert by_key["head", "latency_ms"].values == [pytest.approx(float(np.median(costs.loc["head", "latency_times_ms"])))]

"""The paper template's records carry the classifier outputs they were computed from, one unit per test image."""
from __future__ import annotations

import pandas as pd
import pytest

from mdbench import notebook, results
from mdbench import samples as S
from mdbench.papers._template import experiment as exp


def test_template_records_carry_per_image_outputs_that_give_them_back(tmp_path):
    cfg = exp.Config(seeds=(0, 1), n_train=32, n_test=24, image_size=8, epochs=1)
    data = exp.load_data(cfg)
    outputs = pd.concat([exp.run(data, cfg, seed) for seed in cfg.seeds], ignore_index=True)
    assert list(outputs.columns) == ["seed", "unit", "label", "prob_0", "prob_1", "row"]
    session = notebook.Session("_template", "smoke", cfg, results.ResultStore("_template", "smoke", root=tmp_path),
                               True, {})
    session.record_frame("table1", exp.record(outputs), dataset=data.name, dataset_checksum=data.checksum,
                         config=cfg.as_record(), samples=outputs)
    records = session.store.records()
    assert sorted(rec.row for rec in records) == ["trained", "untrained"]
    for rec in records:
        assert rec.seeds == [0, 1] and rec.samples_ref == S.SamplesRef(rec.samples["file"], "accuracy", 100.0)
        frame = session.store.samples(rec)
        for seed, value in zip(rec.seeds, rec.values, strict=True):
            own = frame[frame["seed"] == seed]
            assert own["unit"].tolist() == [str(i) for i in range(cfg.n_test)]  # the same images in both rows
            assert own["label"].tolist() == data.test.tensors[1].tolist()
            assert S.aggregate(own, rec.samples_ref, rec.metric) == pytest.approx(value, rel=1e-12)

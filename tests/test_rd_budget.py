"""RD's cost model (mdbench/papers/rd/budget.py): FLOPs per image counted, the grid's steps, FLOPs and minutes
worked out by hand on made-up rates."""
from __future__ import annotations

import pandas as pd
import pytest
from torch import nn

from mdbench.models.reprogramming import FrozenFM, MeanPool, PooledEncoder
from mdbench.papers.rd import budget
from mdbench.papers.rd import experiment as rdx

# 1000 FLOP/s everywhere, a 1 s floor per student step, 0.5 s per head step, 2 s per run: easy sums
RATES = budget.Throughput(fm_tflops=1e-9, student_tflops=1e-9, step_floor_ms=1000, head_step_ms=500, run_overhead_s=2)
FLOPS = {"fm": 1000.0, "tiny": 100.0, "other": 100.0, "phi": 10.0}
SIZES = {"a": budget.DataSize(64, 20, 2), "b": budget.DataSize(64, 20, 2)}


def _plan(**config) -> pd.DataFrame:
    cfg = rdx.Config(**{"datasets": ("a", "b"), "seeds": (0, 1), "fractions": (1.0,), "students": ("tiny",),
                        "steps": 5, "epochs": 2, "batch_size": 16, **config})
    methods = ["fm_full_ft", "fm_linear_probe", "student", "rd", "rd_no_reprogramming"]
    return budget.plan(cfg, SIZES, methods, FLOPS, RATES).set_index(["dataset", "student", "method"])


def test_plan_counts_steps_flops_and_minutes_as_worked_out_by_hand():
    grid = _plan(phi_space="feature")
    # 64 images in batches of 16: 4 an epoch, 2 epochs = 8 steps (more than the 5 of the floor); 2 seeds
    assert (grid.drop(index="fm_features", level="method").steps == 8).all()
    student = grid.loc[("a", "tiny", "student")]
    # a step: 16 images x 3 x 100 = 4,800 FLOP = 4.8 s; scoring: (64 + 20) x 100 = 8,400 = 8.4 s; plus 2 s a run
    assert student.step_tflop == pytest.approx(4800e-12) and student.step_ms == pytest.approx(4800)
    assert student.tflop == pytest.approx(2 * (8 * 4800 + 8400) * 1e-12)
    assert student.minutes == pytest.approx(2 * (8 * 4.8 + 8.4 + 2) / 60)
    # RD on the cached feature: the reprogrammer's 3 x 10 more per image, no FM
    assert grid.loc[("a", "tiny", "rd")].step_tflop == pytest.approx(16 * 330e-12)
    assert grid.loc[("a", "tiny", "rd_no_reprogramming")].step_tflop == pytest.approx(4800e-12)
    # the FM fine-tuned: 16 x 3 x 1000 a step; scored on the test images, and the training images twice (precise
    # BatchNorm, and KD teacher logits: it is the teacher)
    full_ft = grid.loc[("a", "—", "fm_full_ft")]
    assert full_ft.minutes == pytest.approx(2 * (8 * 48 + (20 + 64 + 64) + 2) / 60)
    probe = grid.loc[("a", "—", "fm_linear_probe")]  # a head on cached features: the head's floor, no scoring
    assert probe.tflop == 0 and probe.minutes == pytest.approx(2 * (8 * 0.5 + 2) / 60)
    features = grid.loc[("a", "—", "fm_features")]  # the FM over every image once
    assert features.tflop == pytest.approx(84 * 1000e-12) and features.minutes == pytest.approx(84 / 60)


def test_plan_runs_the_fm_in_rds_step_when_phi_reprograms_the_image():
    rd = _plan(phi_space="image").loc[("a", "tiny", "rd")]
    # forward and backward through the frozen FM (2 x 1000) beside the student's and phi's 330, and the reprogrammed
    # FM scored on the 20 test images
    assert rd.step_tflop == pytest.approx(16 * 2330e-12)
    assert rd.minutes == pytest.approx(2 * (8 * 37.28 + 8.4 + 20 + 2) / 60)


def test_plan_trains_claim_students_on_the_claims_rows_of_their_datasets_only():
    grid = _plan(claim_students=("other",), claim_datasets=("b",)).reset_index()
    assert set(grid[grid.student == "other"].dataset) == {"b"}
    assert set(grid[grid.student == "other"].method) == {"rd"}  # of the methods, the only claim row
    assert set(grid[grid.student == "tiny"].method) == {"student", "rd", "rd_no_reprogramming"}
    assert budget.summary(grid).startswith("22 runs, 176 optimizer steps")  # (5 + 5 + 1) rows x 2 seeds, 8 steps


def test_forward_flops_counts_the_fm_and_each_reprogrammer_by_hand():
    body = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU())
    fm = FrozenFM(PooledEncoder(body, MeanPool((2, 3)), 8, None, "tiny"))
    cfg = rdx.Config(image_size=16, reprogrammer_hidden=4)
    image = budget.forward_flops(cfg, fm, [])
    assert image["fm"] == 2 * 3 * 8 * 25 * 16 * 16            # one 5x5 convolution, 3 -> 8 channels, 16x16 outputs
    assert image["phi"] == 2 * (2 * 3 * 4 * 9) * 16 * 16       # two 3x3 convolutions, 3 -> 4 -> 3 channels
    assert budget.forward_flops(rdx.Config(image_size=16, reprogrammer_hidden=4, phi_space="feature"), fm,
                                [])["phi"] == 2 * (2 * 8 * 4)  # two linear layers, 8 -> 4 -> 8
    assert budget.forward_flops(cfg, fm, ["resnet18"])["resnet18"] > image["fm"]

"""RD's cost model (mdbench/papers/rd/budget.py): FLOPs per image counted, the grid's steps, FLOPs and minutes
worked out by hand on made-up rates."""
from __future__ import annotations

import pandas as pd
import pytest
from torch import nn

from mdbench.models.reprogramming import FrozenFM, MeanPool, PooledEncoder
from mdbench.papers.rd import budget
from mdbench.papers.rd import experiment as rdx

# 1000 FLOP/s everywhere, a 1 s floor per student step, 0.5 s per head step, 0.25 s per epoch, 2 s per run: easy sums
RATES = budget.Throughput(fm_tflops=1e-9, student_tflops=1e-9, step_floor_ms=1000, head_step_ms=500,
                          epoch_overhead_ms=250, run_overhead_s=2)
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
    trained = grid.drop(index="fm_features", level="method")
    assert (trained.steps == 8).all() and (trained.epochs == 2).all()
    student = grid.loc[("a", "tiny", "student")]
    # a step: 16 images x 3 x 100 = 4,800 FLOP = 4.8 s; scoring: (64 + 20) x 100 = 8,400 = 8.4 s; 2 epochs of
    # 0.25 s; plus 2 s a run. The GPU computes the steps and the scoring only.
    assert student.step_tflop == pytest.approx(4800e-12) and student.step_ms == pytest.approx(4800)
    assert student.tflop == pytest.approx(2 * (8 * 4800 + 8400) * 1e-12)
    assert student.minutes == pytest.approx(2 * (8 * 4.8 + 8.4 + 0.5 + 2) / 60)
    assert student.compute_minutes == pytest.approx(2 * (8 * 4.8 + 8.4) / 60)
    # RD on the cached feature: the reprogrammer's 3 x 10 more per image, no FM
    assert grid.loc[("a", "tiny", "rd")].step_tflop == pytest.approx(16 * 330e-12)
    assert grid.loc[("a", "tiny", "rd_no_reprogramming")].step_tflop == pytest.approx(4800e-12)
    # the FM fine-tuned: 16 x 3 x 1000 a step; scored on the test images, and the training images twice (precise
    # BatchNorm, and KD teacher logits: it is the teacher)
    full_ft = grid.loc[("a", "—", "fm_full_ft")]
    assert full_ft.minutes == pytest.approx(2 * (8 * 48 + (20 + 64 + 64) + 0.5 + 2) / 60)
    probe = grid.loc[("a", "—", "fm_linear_probe")]  # a head on cached features: the head's floor, no scoring
    assert probe.tflop == 0 and probe.minutes == pytest.approx(2 * (8 * 0.5 + 0.5 + 2) / 60)
    assert probe.compute_minutes == 0  # nothing the rates count: all of it is the host's floor
    features = grid.loc[("a", "—", "fm_features")]  # the FM over every image once, all of it computing
    assert features.tflop == pytest.approx(84 * 1000e-12) and features.minutes == pytest.approx(84 / 60)
    assert features.compute_minutes == features.minutes and features.epochs == 0


def test_plan_counts_the_epochs_train_fit_makes_the_last_one_cut_short():
    # 5 steps (no epochs) of 4 full batches an epoch: 2 epochs, the second after 1 step; 10% of 64 images: 6, one
    # batch of 6 an epoch: 5 epochs
    grid = _plan(epochs=0, fractions=(1.0, 0.1))
    student = grid.loc[("a", "tiny", "student")]
    assert student.steps == 5 and student.epochs == 2
    assert student.minutes == pytest.approx(2 * (5 * 4.8 + 8.4 + 2 * 0.25 + 2) / 60)
    low = grid.loc[("a-10pct", "tiny", "student")]
    assert low.steps == 5 and low.epochs == 5
    # a step of 6 images: 1,800 FLOP = 1.8 s; scoring (6 + 20) x 100 = 2.6 s
    assert low.minutes == pytest.approx(2 * (5 * 1.8 + 2.6 + 5 * 0.25 + 2) / 60)
    # epochs of at least 3 batches: one pass of 4 on all the images (2 epochs), 3 passes of 1 on 10% (2 epochs)
    grid = _plan(epochs=0, fractions=(1.0, 0.1), resident_batches=True, epoch_batches=3)
    assert grid.loc[("a", "tiny", "student")].epochs == 2 and grid.loc[("a-10pct", "tiny", "student")].epochs == 2


def test_plan_runs_the_fm_in_rds_step_when_phi_reprograms_the_image():
    rd = _plan(phi_space="image").loc[("a", "tiny", "rd")]
    # forward and backward through the frozen FM (2 x 1000) beside the student's and phi's 330, and the reprogrammed
    # FM scored on the 20 test images
    assert rd.step_tflop == pytest.approx(16 * 2330e-12)
    assert rd.minutes == pytest.approx(2 * (8 * 37.28 + 8.4 + 20 + 0.5 + 2) / 60)


def test_plan_trains_claim_students_on_the_claims_rows_of_their_datasets_only():
    grid = _plan(claim_students=("other",), claim_datasets=("b",)).reset_index()
    assert set(grid[grid.student == "other"].dataset) == {"b"}
    assert set(grid[grid.student == "other"].method) == {"rd"}  # of the methods, the only claim row
    assert set(grid[grid.student == "tiny"].method) == {"student", "rd", "rd_no_reprogramming"}
    assert budget.summary(grid).startswith("22 runs, 176 optimizer steps")  # (5 + 5 + 1) rows x 2 seeds, 8 steps


def test_summary_states_minutes_and_the_share_the_gpu_computes():
    grid = pd.DataFrame({"dataset": ["a", "a"], "student": ["—", "s"], "method": ["fm_features", "rd"],
                         "runs": [1, 3], "steps": [0, 10], "tflop": [500.0, 700.0], "minutes": [1.0, 3.0],
                         "compute_minutes": [1.0, 1.4]})
    assert budget.summary(grid) == ("3 runs, 30 optimizer steps, 1.2 PFLOP: about 4 min at the plan's rates, "
                                    "the GPU computing 60 % of it")


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


def test_profile_config_is_what_reproduce_runs_and_main_prints_its_plan(monkeypatch, capsys):
    gpu = budget.profile_config("gpu")
    assert gpu.device == "cuda" and gpu.resident_batches and gpu.fm == "litemedsam" and len(gpu.seeds) >= 3
    with pytest.raises(ValueError, match="notebook's own defaults"):
        budget.profile_config("smoke")
    # main on a shrunk cpu profile: synthetic data, the FM's stem
    shrunk = rdx.Config(datasets=("synthetic",), max_train=40, max_test=10, fm="litemedsam_stem", image_size=16,
                        students=("resnet18",), seeds=(0, 1, 2), methods=("fm_linear_probe", "student", "rd"))
    monkeypatch.setattr(budget, "profile_config", lambda profile: shrunk)
    grid = budget.main(["--profile", "cpu"])
    out = capsys.readouterr().out
    assert "RD at the cpu profile on synthetic (40 train, 10 test); batches of 32" in out
    assert budget.summary(grid) in out and "at optimistic rates" in out
    assert set(grid.method) == {"fm_features", "fm_linear_probe", "student", "rd"} and (grid.runs[1:] == 3).all()


def test_the_budget_command_without_data_says_which_flag_to_pass(monkeypatch, capsys):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        budget.main(["--profile", "gpu"])
    assert exit_.value.code == 2 and "pass --data-dir DIR" in capsys.readouterr().err

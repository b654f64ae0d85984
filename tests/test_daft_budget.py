"""DAFT's cost model (mdbench/papers/daft/budget.py): the sizes counted from cases, and each stage's FLOPs and
seconds worked out by hand on made-up rates."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdbench.models import build_model
from mdbench.papers.daft import budget
from mdbench.papers.daft import experiment as daft


def _case(name: str, dims: int, slices_with_object: int = 0, boxes: list | None = None) -> dict:
    if dims == 2:
        gts = np.zeros((8, 8), np.uint8)
        gts[2:4, 2:4] = 1
        return {"name": name, "dims": 2, "gts": gts, "boxes": np.array([[2, 2, 3, 3]])}
    gts = np.zeros((10, 8, 8), np.uint8)
    gts[:slices_with_object, 2:4, 2:4] = 1
    return {"name": name, "dims": 3, "gts": gts, "boxes": np.array(boxes)}


CASES = {
    "train": [_case("2DBox_Endoscopy_a.npz", 2), _case("2DBox_US_b.npz", 2), _case("3DBox_MR_c.npz", 3, 6, [[0] * 6])],
    "val": [_case("2DBox_Endoscopy_d.npz", 2), _case("3DBox_MR_e.npz", 3, 3, [[0] * 6])],
    # two boxes over slices 1-4 and 3-7: 7 slices embedded in one batch, 4 + 5 decoder calls
    "test": [_case("2DBox_US_f.npz", 2), _case("3DBox_MR_g.npz", 3, 8, [[0, 0, 1, 4, 4, 4], [0, 0, 3, 4, 4, 7]])],
}


def test_sizes_count_the_inputs_items_and_calls_by_hand():
    counts = budget.sizes(CASES, ["Endoscopy", "3D"], kd_slices_per_volume=4, kd_images=None,
                          daft_slices_per_volume=5)
    assert counts == {
        "kd_train": 2 + 4, "kd_val": 1 + 3,            # every 2D image; up to 4 slices with an object per volume
        "kd_test": 1 + 4,                              # the same of the test cases: KD's MSE is measured on them
        "ft_train": 3, "ft_val": 2,                    # one item per case (a random slice of a volume)
        "daft_train": 1 + 5, "daft_val": 1 + 3,        # the experts' cases (not US); up to 5 slices per volume
        "experts": 2, "bank_frames": 2 + 6 + 1 + 3,    # every slice with an object, train and val
        "test_encoder": 1 + 1, "test_decoder": 1 + 9,  # all test cases for one model
        "expert_encoder": 1, "expert_decoder": 9,      # the volume only: US goes to the general model
    }
    assert budget.sizes(CASES, ["Endoscopy", "3D"], 4, 5, 5)["kd_train"] == 5  # kd_images caps it


# 1 GFLOP/s at fp32, training 2x faster under amp; 1 s a call, 0.1 s a converted case, 0.5 s a bank frame
RATES = budget.Rates(fp32_tflops=1e-3, bf16_speedup=2.0, compile_speedup=1.5, compile_s=7.0, compiled_graphs=4,
                     encoder_call_ms=1000, decoder_call_ms=1000, convert_case_ms=100, bank_frame_ms=500,
                     overhead_s=10, busy=1.0, launch_bound_busy=0.5)
GFLOPS = {"encoder": 1.0, "decoder": 0.5, "teacher": 2.0}
COUNTS = {"kd_train": 10, "kd_val": 4, "kd_test": 5, "ft_train": 8, "ft_val": 2, "daft_train": 6, "daft_val": 3, "experts": 2,
          "bank_frames": 12, "test_encoder": 5, "test_decoder": 7, "expert_encoder": 3, "expert_decoder": 4}


def _estimate(**config) -> pd.DataFrame:
    cfg = daft.Config(seeds=(0, 1), kd_epochs=3, ft_epochs=2, daft_epochs=1, **config)
    return budget.estimate(cfg, COUNTS, GFLOPS, cases_converted=20, rates=RATES).set_index("stage")


def test_estimate_works_out_each_stage_by_hand():
    frame = _estimate(kd_patience=2, amp=True, on_device=True)
    assert frame.loc["overheads: start, model costs, router, export", "seconds"] == 10
    assert frame.loc["real datasets -> challenge cases", "seconds"] == pytest.approx(2.0)
    # the teacher embeds 10 + 4 KD inputs and 5 test ones once, in fp32: 19 x 2 GFLOP at 1 GFLOP/s
    assert frame.loc["teacher embeddings of the KD and test inputs", "seconds"] == pytest.approx(38)
    # KD: per epoch 3 x 10 x 1 (training, at 2 GFLOP/s) + (4 held out + 256 calibration) x 1 (at 2 too);
    # per seed 3 epochs, and 2 x 5 + 10 fp32 passes (MSE before and after on the test inputs, BatchNorm); 2 seeds
    kd = frame.loc["KD, up to 3 epochs (x 2 seeds)"]
    assert kd.tflop == pytest.approx(2 * (3 * 290 + 20) / 1e3)
    assert kd.seconds == pytest.approx(2 * (3 * 290 / 2 + 20))
    # general FT: per epoch 3 x 8 x 1.5 + 2 x 1.5 + 256 x 1; 2 epochs, 2 seeds, at 2 GFLOP/s
    assert frame.loc["general FT, up to 2 epochs (x 2)", "seconds"] == pytest.approx(2 * 2 * (36 + 3 + 256) / 2)
    # DAFT: 3 x 6 x 1.5 + 3 x 1.5 + 2 experts x 256
    assert frame.loc["DAFT, 2 experts, up to 1 epochs (x 2)", "seconds"] == pytest.approx(2 * (27 + 4.5 + 512) / 2)
    # prompt banks: 12 + 6 + 3 frames a seed at 0.5 s
    assert frame.loc["prompt banks (preprocessing on the host)", "seconds"] == pytest.approx(2 * 21 * 0.5)
    # Table A: the baseline once (5 + 7 calls), then per seed KD only and general FT on all, experts on theirs
    assert frame.loc["Table A: LiteMedSAM on the test cases", "seconds"] == pytest.approx(12)
    assert frame.loc["Table A: KD only, general FT, experts (x 2)", "seconds"] == pytest.approx(2 * (13 + 18))
    assert "torch.compile" not in frame.index


def test_estimate_without_a_held_out_set_fp32_and_compiled():
    frame = _estimate(compile=True)
    kd = frame.loc["KD, up to 3 epochs (x 2 seeds)"]  # no held-out passes; fp32 training 1.5x faster compiled
    assert kd.seconds == pytest.approx(2 * (3 * 30 / 1.5 + 20))
    assert frame.loc["torch.compile", "seconds"] == 28 and "prompt banks (preprocessing on the host)" not in frame.index
    assert frame.loc["teacher embeddings of the KD and test inputs", "seconds"] == pytest.approx(30)  # (10 + 5) x 2


def test_summary_and_utilisation_weigh_stages_by_their_seconds():
    frame = pd.DataFrame({"stage": ["a", "b", "c"], "tflop": [1000.0, 0.0, 0.0], "seconds": [60.0, 30.0, 30.0],
                          "bound": ["compute", "launch", "host"]})
    assert budget.utilisation(frame, RATES) == pytest.approx(100 * (60 + 15) / 120)
    assert budget.summary(frame).startswith("about 2 min in all (1.0 PFLOP): 1.0 min computing, 0.5 min launch")


def test_forward_gflops_of_the_models():
    teacher = build_model("litemedsam")
    gflops = budget.forward_gflops(teacher, daft.build_student(teacher, daft.Config(
        student_backbone="efficientvit_b0", student_depths=(), neck_width=32, neck_depth=1, neck_block="mbconv")))
    assert gflops["teacher"] == pytest.approx(74.9, abs=0.1)  # TinyViT at 256 (model_costs records the same)
    assert 0 < gflops["encoder"] < gflops["teacher"] and 1 < gflops["decoder"] < 10

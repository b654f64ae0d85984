"""Metrics against values worked out by hand (classification, Dice, HD95, NSD, challenge rule, CIs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mdbench.metrics import (
    classification_metrics,
    dice_per_class,
    dsc_nsd_challenge,
    hd95,
    mean_std_ci,
    nsd,
)

# ---------------------------------------------------------------- classification


def test_classification_metrics_tiny_example():
    # argmax predictions: 0, 1, 0, 0 against truth 0, 1, 1, 0
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    m = classification_metrics([0, 1, 1, 0], probs)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    # class 0: precision 2/3, recall 1 -> F1 0.8; class 1: precision 1, recall 1/2 -> F1 2/3
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    # positives score 0.8, 0.4; negatives 0.1, 0.3: every positive ranks above every negative
    assert m["auc"] == pytest.approx(1.0)


def test_auc_perfect_and_reversed_ranking():
    y = np.array([0, 0, 1, 1])
    pos = np.array([0.1, 0.2, 0.7, 0.9])
    assert classification_metrics(y, pos)["auc"] == pytest.approx(1.0)  # (N,) positive-class scores
    assert classification_metrics(y, 1 - pos)["auc"] == pytest.approx(0.0)
    y3 = np.array([0, 1, 2, 0, 1, 2])
    onehot = np.eye(3)[y3] * 0.7 + 0.1  # rows sum to 1, true class highest
    assert classification_metrics(y3, onehot)["auc"] == pytest.approx(1.0)
    assert classification_metrics(y3, onehot)["accuracy"] == 1.0


def test_logits_are_softmaxed_and_unnormalised_probs_refused():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.2, 2.0]])
    y = torch.tensor([0, 1, 2, 2])
    from_logits = classification_metrics(y, logits, scores_are="logits")
    from_probs = classification_metrics(y, torch.softmax(logits, 1))
    assert from_logits == pytest.approx(from_probs)
    assert from_logits["accuracy"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="scores_are='logits'"):
        classification_metrics(y, logits)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 5], np.array([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="num_classes"):
        classification_metrics([0, 1], np.array([[0.5, 0.5], [0.5, 0.5]]), num_classes=3)


def test_auc_is_nan_with_a_warning_when_a_class_is_absent():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    with pytest.warns(UserWarning, match=r"classes \[2\] are absent"):
        m = classification_metrics([0, 1, 0], probs)
    assert math.isnan(m["auc"]) and m["accuracy"] == 1.0


# ---------------------------------------------------------------- segmentation


def test_dice_of_known_masks():
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 1:3, 1:3] = 1  # 4 pixels
    target[0, 1:3, 1] = 1  # 2 pixels, both inside pred
    pred[0, 5, 5] = 2  # class 2 only in pred
    d = dice_per_class(pred, target, num_classes=4)
    assert d.shape == (1, 3)
    assert d[0, 0].item() == pytest.approx(2 * 2 / (4 + 2))
    assert d[0, 1].item() == 0.0  # present in one only
    assert math.isnan(d[0, 2].item())  # absent from both
    with_bg = dice_per_class(pred.numpy(), target.numpy(), num_classes=4, include_background=True)
    assert with_bg.shape == (1, 4) and with_bg[0, 1] == d[0, 0]


def test_hd95_of_single_points():
    pred = np.zeros((2, 8, 8), dtype=np.int64)
    target = np.zeros_like(pred)
    pred[0, 1, 1], target[0, 4, 5] = 1, 1  # 3 rows and 4 columns apart -> 5
    pred[1, 2, 2], target[1, 2, 5] = 1, 1  # 3 columns apart
    hd = hd95(pred, target, num_classes=2)
    assert hd[:, 0].tolist() == pytest.approx([5.0, 3.0])
    assert hd95(pred, target, num_classes=2, spacing=(1.0, 2.0))[1, 0].item() == pytest.approx(6.0)
    target[1] = 0
    assert math.isnan(hd95(pred, target, num_classes=2)[1, 0].item())  # empty target: undefined


def test_nsd_single_points_and_identical_masks():
    pred = np.zeros((1, 8, 8), dtype=np.int64)
    target = np.zeros_like(pred)
    pred[0, 2, 2], target[0, 2, 5] = 1, 1  # boundaries 3 pixels apart
    assert nsd(pred, target, 2, tolerance=2.0).item() == 0.0
    assert nsd(pred, target, 2, tolerance=3.0).item() == 1.0
    blob = np.zeros((1, 9, 9, 5), dtype=np.int64)
    blob[0, 2:7, 2:7, 1:4] = 1
    assert nsd(blob, blob, 2).item() == 1.0
    assert math.isnan(nsd(np.zeros_like(blob), np.zeros_like(blob), 2).item())
    assert nsd(np.zeros_like(blob), blob, 2).item() == 0.0


def test_segmentation_bad_input():
    a = np.zeros((1, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_class(a, np.zeros((1, 4, 5), dtype=np.int64), 2)
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\)"):
        dice_per_class(a + 2, a, 2)
    with pytest.raises(ValueError, match="integer"):
        dice_per_class(a.astype(float), a, 2)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        dice_per_class(a[0], a[0], 2)


# ---------------------------------------------------------------- challenge rule


def test_challenge_identical_and_dsc_at_most_0_2_gives_nsd_0():
    gt = np.zeros((20, 20), dtype=np.int64)
    gt[5:15, 5:15] = 1
    assert dsc_nsd_challenge(gt, gt) == {"dsc": 1.0, "nsd": 1.0}
    small = np.zeros_like(gt)
    small[5:7, 5:7] = 1  # 4 of the 100 pixels: DSC = 8 / 104
    raw = nsd(small[None], gt[None], 2, use_subvoxels=True).item()
    assert raw > 0  # so the 0 below comes from the rule, not from the geometry
    out = dsc_nsd_challenge(small, gt)
    assert out["dsc"] == pytest.approx(8 / 104) and out["nsd"] == 0.0


def test_challenge_mean_over_gt_labels_2d_and_3d():
    gt = np.zeros((20, 20), dtype=np.int64)
    gt[2:8, 2:8], gt[12:18, 12:18] = 1, 2
    pred = np.where(gt == 1, 1, 0)
    pred[0, 0] = 3  # labels above max(gt) are not scored
    out = dsc_nsd_challenge(pred, gt)  # label 1 perfect, label 2 missed
    assert out["dsc"] == pytest.approx((1.0 + 0.0) / 2) and out["nsd"] == pytest.approx((1.0 + 0.0) / 2)

    vol = np.zeros((5, 12, 12), dtype=np.int64)
    vol[1:4, 3:9, 3:9] = 1
    assert dsc_nsd_challenge(vol, vol, spacing=(2.5, 0.8, 0.8)) == {"dsc": 1.0, "nsd": 1.0}
    with pytest.raises(ValueError, match="spacing"):
        dsc_nsd_challenge(vol, vol)
    with pytest.warns(UserWarning, match="no foreground"):
        empty = dsc_nsd_challenge(np.zeros_like(gt), np.zeros_like(gt))
    assert math.isnan(empty["dsc"]) and math.isnan(empty["nsd"])


def test_challenge_scores_uint16_label_maps_like_int64():
    """The challenge stores segmentations as uint16, which many torch ops do not support."""
    gt = np.zeros((3, 16, 16), dtype=np.uint16)
    gt[:, 4:12, 4:12], gt[1, 1:3, 1:3] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, 4:12, 5:13] = 1
    wide = dsc_nsd_challenge(pred.astype(np.int64), gt.astype(np.int64), spacing=(1.0, 1.0, 1.0))
    assert dsc_nsd_challenge(pred, gt, spacing=(1.0, 1.0, 1.0)) == wide


def test_challenge_nsd_uses_spacing_in_mm():
    gt = np.zeros((3, 16, 16), dtype=np.int64)
    gt[:, 4:12, 4:12] = 1
    pred = np.zeros_like(gt)
    pred[:, 4:12, 5:13] = 1  # shifted by one voxel along the last axis
    coarse = dsc_nsd_challenge(pred, gt, spacing=(1.0, 1.0, 3.0))["nsd"]  # shift = 3 mm > tolerance 2
    fine = dsc_nsd_challenge(pred, gt, spacing=(1.0, 1.0, 1.0))["nsd"]  # shift = 1 mm
    assert fine == pytest.approx(1.0) and coarse < fine


# ---------------------------------------------------------------- summaries


def test_mean_std_ci_against_numpy_and_scipy():
    x = np.array([0.81, 0.85, 0.79, 0.88, 0.84])
    out = mean_std_ci(x, confidence=0.9)
    half = stats.t.ppf(0.95, df=4) * x.std(ddof=1) / np.sqrt(5)
    assert out["mean"] == pytest.approx(x.mean()) and out["std"] == pytest.approx(x.std(ddof=1))
    assert out["ci_low"] == pytest.approx(x.mean() - half) and out["ci_high"] == pytest.approx(x.mean() + half)
    assert out["n"] == 5 and out["n_nan"] == 0


def test_mean_std_ci_edge_cases():
    one = mean_std_ci([0.5])
    assert one["std"] == 0.0 and one["n"] == 1 and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    with_nan = mean_std_ci([1.0, float("nan"), 3.0])
    assert with_nan["mean"] == 2.0 and with_nan["n"] == 2 and with_nan["n_nan"] == 1
    const = mean_std_ci([2.0, 2.0, 2.0])
    assert const["ci_low"] == const["ci_high"] == 2.0
    with pytest.raises(ValueError, match="no non-nan"):
        mean_std_ci([float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_std_ci([1.0, 2.0], confidence=95)

"""Dice + BCE + IoU-prediction loss of DAFT / MedSAM fine-tuning, against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from mdbench.losses.segmentation import SegmentationLoss, mask_iou

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr = smooth_dr


def test_terms_at_logit_zero_match_hand_values():
    # p = sigmoid(0) = 0.5 on 4 pixels, target [1, 1, 0, 0]:
    # Dice (squared_pred): 1 - (2 * sum(p t) + s) / (sum(p^2) + sum(t^2) + s) = 1 - (2 + s) / (1 + 2 + s)
    # BCE: -log(0.5) on every pixel = log 2
    # IoU target: 0.5 > 0.5 is False, so the hard prediction is empty and IoU = 0 / 2 = 0; MSE(0.5, 0) = 0.25
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    terms = SegmentationLoss().terms(logits, torch.tensor([[0.5]]), target)
    assert terms["dice"].item() == pytest.approx(1 - (2 + SMOOTH) / (3 + SMOOTH), abs=1e-6)
    assert terms["bce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["iou"].item() == pytest.approx(0.25, abs=1e-7)


def test_confident_correct_prediction_and_iou_target():
    # logits +-10 on the right pixels: p ~ 1 / 0, Dice ~ 0, BCE ~ log(1 + e^-10); hard IoU = 1, MSE(0.8, 1) = 0.04
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    logits = 20 * target - 10
    loss = SegmentationLoss()
    terms = loss.terms(logits, torch.tensor([[0.8]]), target)
    assert terms["dice"].item() == pytest.approx(0.0, abs=1e-4)
    assert terms["bce"].item() == pytest.approx(math.log1p(math.exp(-10)), abs=1e-6)  # float32 rounding
    assert terms["iou"].item() == pytest.approx(0.04, abs=1e-6)
    total = loss(logits, torch.tensor([[0.8]]), target)
    assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)


def test_weights_and_batch_mean():
    # two samples, the second twice as wrong: each term is the batch mean, each weight scales its own term
    target = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    logits = torch.tensor([[[[2.0, -2.0]]], [[[-1.0, 1.0]]]])
    iou_pred = torch.tensor([[1.0], [1.0]])
    terms = SegmentationLoss().terms(logits, iou_pred, target)
    # hard IoU: sample 1 exact (1), sample 2 disjoint (0): MSE = ((1-1)^2 + (1-0)^2) / 2
    assert terms["iou"].item() == pytest.approx(0.5)
    weighted = SegmentationLoss(dice_weight=2.0, bce_weight=0.0, iou_weight=3.0)(logits, iou_pred, target)
    assert weighted.item() == pytest.approx(2 * terms["dice"].item() + 3 * 0.5, rel=1e-6)


def test_gradient_reaches_logits_and_iou_head_but_not_through_the_iou_target():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    iou_pred = torch.rand(3, 1, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8) > 0.5).float()
    terms = SegmentationLoss().terms(logits, iou_pred, target)
    terms["iou"].backward()
    assert logits.grad is None  # the IoU target is computed without gradient
    assert iou_pred.grad is not None and iou_pred.grad.abs().sum() > 0
    SegmentationLoss()(logits, iou_pred.detach(), target).backward()
    assert logits.grad.abs().sum() > 0


def test_mask_iou_empty_masks_and_bad_shapes():
    empty = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    full = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    assert mask_iou(empty, empty).tolist() == [[1.0], [1.0]]
    assert mask_iou(full, empty).tolist() == [[0.0], [0.0]]
    half = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    half[..., 0] = True
    assert mask_iou(half, torch.ones(1, 1, 2, 2)).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one shape"):
        mask_iou(empty, torch.zeros(2, 1, 4, 5))


def test_bad_input_refused():
    loss = SegmentationLoss()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="iou_pred"):
        loss(torch.zeros(2, 1, 4, 4), torch.zeros(2), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=">= 0"):
        SegmentationLoss(bce_weight=-1)

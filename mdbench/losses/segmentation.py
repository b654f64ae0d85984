"""Box-prompted segmentation loss of MedSAM / DAFT fine-tuning: Dice + BCE + IoU-prediction MSE.

For one batch of ``B`` single-mask predictions (one box per sample)::

    L = w_dice * Dice(sigmoid(logits), gt) + w_bce * BCEWithLogits(logits, gt) + w_iou * MSE(iou_pred, IoU(p > 0.5, gt))

- ``Dice`` is MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)``: per sample
  ``1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5)``, averaged over the batch.
- ``BCE`` is the mean binary cross-entropy over every pixel of the batch.
- ``IoU`` is the hard IoU of the thresholded prediction (``sigmoid(logits) > 0.5``) with the ground truth; it is a
  target only (no gradient flows through it), so the mask decoder's IoU head learns to predict its own mask quality.
  Both masks empty counts as IoU 1 (the challenge's code would divide by zero).

All weights are 1 in DAFT (``finetune.py``), as in MedSAM's LiteMedSAM training script.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["SegmentationLoss", "mask_iou"]


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard IoU per sample of two binary masks.

    Args:
        pred, target: (B, 1, H, W) boolean or {0, 1} tensors.

    Returns:
        (B, 1) float: ``|pred & target| / |pred | target|``, 1 where both are empty.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"mask_iou takes two (B, 1, H, W) masks of one shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
    pred, target = pred.bool(), target.bool()
    intersection = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    return iou[:, None]


class SegmentationLoss(nn.Module):
    """Dice + BCE + IoU-prediction loss (see the module docstring).

    ``forward(logits, iou_pred, target)`` returns the weighted sum; :meth:`terms` returns the three terms
    (unweighted) for logging.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, iou_weight: float = 1.0) -> None:
        super().__init__()
        if min(dice_weight, bce_weight, iou_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got {dice_weight}, {bce_weight}, {iou_weight}")
        self.weights = {"dice": dice_weight, "bce": bce_weight, "iou": iou_weight}
        self.dice = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")

    def terms(self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms.

        Args:
            logits: (B, 1, H, W) mask logits.
            iou_pred: (B, 1) predicted IoU (the mask decoder's IoU head).
            target: (B, 1, H, W) binary ground truth (any dtype; non-zero = foreground).

        Returns:
            ``{"dice", "bce", "iou"}`` scalar tensors.
        """
        if logits.ndim != 4 or logits.shape[1] != 1 or logits.shape != target.shape:
            raise ValueError(
                f"logits and target must be (B, 1, H, W) of one shape, got {tuple(logits.shape)}, {tuple(target.shape)}"
            )
        if iou_pred.shape != (logits.shape[0], 1):
            raise ValueError(f"iou_pred must be ({logits.shape[0]}, 1), got {tuple(iou_pred.shape)}")
        target = (target > 0).to(logits.dtype)
        with torch.no_grad():
            iou_target = mask_iou(torch.sigmoid(logits) > 0.5, target > 0).to(iou_pred.dtype)
        return {
            "dice": self.dice(logits, target),
            "bce": F.binary_cross_entropy_with_logits(logits, target),
            "iou": F.mse_loss(iou_pred, iou_target),
        }

    def forward(self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum of :meth:`terms` (a scalar)."""
        terms = self.terms(logits, iou_pred, target)
        # terms has three entries, so the sum is a tensor, never the 0 of an empty sum
        return cast(torch.Tensor, sum(self.weights[name] * value for name, value in terms.items()))

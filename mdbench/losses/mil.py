"""Multiple-instance learning losses: the smooth top-1 SVM that CLAM uses for its instance-level clustering.

Smooth top-1 SVM (Berrada, Zisserman & Kumar, "Smooth Loss Functions for Deep Top-k Classification", ICLR 2018),
as CLAM calls it (``topk.SmoothTop1SVM(n_classes=2)``, alpha = 1, tau = 1)::

    l(s, y) = tau * log sum_j exp((s_j + alpha * [j != y] - s_y) / tau)          (smooth form)
    l(s, y) = max_j (s_j + alpha * [j != y]) - s_y                                (hard form)

The reference implementation (``oval-group/smooth-topk``, ``topk/svm.py``) switches a sample to the hard form
when its largest score leads the second largest by at least ``tau * log(thresh)`` (thresh = 1e3): there the
two forms differ by less than ``tau / thresh`` and the smooth form's exponentials would only lose precision.
Written by hand because the ``topk`` package is unmaintained (PyTorch 0.3) and not on PyPI.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SmoothTop1SVM", "smooth_top1_svm"]


def smooth_top1_svm(scores: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, tau: float = 1.0,
                    thresh: float = 1e3, reduction: str = "mean") -> torch.Tensor:
    """Smooth top-1 multi-class SVM loss.

    Args:
        scores: (N, C) real-valued class scores (logits), C >= 2.
        targets: (N,) int64 labels in ``[0, C)``.
        alpha: margin added to every wrong class (``alpha >= 0``).
        tau: temperature of the smoothing (``tau > 0``); ``tau -> 0`` recovers the hard multi-class hinge.
        thresh: a sample whose top-1 score leads its top-2 score by ``>= tau * log(thresh)`` uses the hard form.
        reduction: ``"mean"`` (over samples, as ``topk``), ``"sum"`` or ``"none"`` ((N,) per-sample losses).

    Returns:
        The loss: a scalar, or (N,) with ``reduction="none"``.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape (N, C) with C >= 2, got {tuple(scores.shape)}")
    if targets.shape != scores.shape[:1]:
        raise ValueError(f"targets must have shape ({scores.shape[0]},), got {tuple(targets.shape)}")
    # on a GPU the gather below refuses them (a device-side assert): reading a check back would stall every step
    if targets.numel() and not targets.is_cuda and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]}), got min {int(targets.min())}, "
                         f"max {int(targets.max())}")
    if alpha < 0 or tau <= 0 or thresh <= 1:
        raise ValueError(f"need alpha >= 0, tau > 0, thresh > 1; got alpha={alpha}, tau={tau}, thresh={thresh}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    targets = targets.long()
    margin = alpha * (torch.arange(scores.shape[1], device=scores.device)[None, :] != targets[:, None])
    augmented = scores + margin - scores.gather(1, targets[:, None])  # (N, C); the target column is 0
    smooth = tau * torch.logsumexp(augmented / tau, dim=1)
    hard = augmented.max(dim=1).values
    top2 = scores.topk(2, dim=1).values
    use_hard = (top2[:, 0] - top2[:, 1]).detach() >= tau * math.log(thresh)
    losses = torch.where(use_hard, hard, smooth)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


class SmoothTop1SVM(nn.Module):
    """Module form of :func:`smooth_top1_svm`: ``SmoothTop1SVM()(scores (N, C), targets (N,)) -> scalar`` (or (N,)
    with ``reduction="none"``)."""

    def __init__(self, alpha: float = 1.0, tau: float = 1.0, thresh: float = 1e3, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha, self.tau, self.thresh, self.reduction = alpha, tau, thresh, reduction

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return smooth_top1_svm(scores, targets, self.alpha, self.tau, self.thresh, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, tau={self.tau}, thresh={self.thresh}, reduction={self.reduction}"

"""Feature projection distillation (FPD, EFCM stage 1): match the teacher's features after a projection head.

EFCM (Li & Diao, arXiv 2409.11817) distils a large medical model into a small student without labels: the
student's pooled features go through a projection head P into the teacher's feature space, and

    L_FPD = w_mse * mean_d (P(S(x))_d - T(x)_d)^2  +  w_cos * (1 - cos(P(S(x)), T(x)))

averaged over the batch. The paper's text gives only "feature projection"; MSE plus a cosine term is our reading
(``docs/papers/efcm.md``). No labels enter: any unlabeled patch is training data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FPDLoss", "fpd_loss"]


def fpd_loss(projected: torch.Tensor, teacher: torch.Tensor, mse_weight: float = 1.0,
             cos_weight: float = 1.0) -> torch.Tensor:
    """FPD loss between projected student features and teacher features.

    Args:
        projected: (B, D) student features after the projection head.
        teacher: (B, D) teacher features of the same inputs (no gradient flows into them).
        mse_weight, cos_weight: weights of the mean squared error (mean over B and D) and of ``1 - cosine``
            (mean over B); ``cos_weight=0`` gives plain feature-MSE distillation.

    Returns:
        Scalar loss.
    """
    if projected.ndim != 2 or projected.shape != teacher.shape:
        raise ValueError(f"projected and teacher features must both be (B, D) of one shape, got "
                         f"{tuple(projected.shape)} and {tuple(teacher.shape)}")
    if mse_weight < 0 or cos_weight < 0 or mse_weight + cos_weight == 0:
        raise ValueError(f"need non-negative weights, not both zero; got mse={mse_weight}, cos={cos_weight}")
    teacher = teacher.detach()
    loss = mse_weight * F.mse_loss(projected, teacher)
    if cos_weight:
        loss = loss + cos_weight * (1 - F.cosine_similarity(projected, teacher, dim=1)).mean()
    return loss


class FPDLoss(nn.Module):
    """Module form of :func:`fpd_loss`: ``FPDLoss()(projected (B, D), teacher (B, D)) -> scalar``."""

    def __init__(self, mse_weight: float = 1.0, cos_weight: float = 1.0) -> None:
        super().__init__()
        self.mse_weight, self.cos_weight = mse_weight, cos_weight

    def forward(self, projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return fpd_loss(projected, teacher, self.mse_weight, self.cos_weight)

    def extra_repr(self) -> str:
        return f"mse_weight={self.mse_weight}, cos_weight={self.cos_weight}"

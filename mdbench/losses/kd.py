"""Knowledge-distillation losses: Hinton KD, FitNet hints, RKD (distance + angle), linear CKA.

Each loss is a plain function on tensors plus, where it has settings or parameters, a small ``nn.Module``. Shapes:
``N`` samples, ``C`` classes, ``D``/``D_s``/``D_t`` feature widths. The teacher side is the second argument and is
detached by the modules (a teacher is never pulled towards its student) unless told otherwise.

Written here because torchdistill is not a dependency of the suite; the formulas follow the papers:

- Hinton, Vinyals & Dean, "Distilling the knowledge in a neural network" (2015): ``tau^2 KL(p_t^tau || p_s^tau)``.
- Romero et al., "FitNets: hints for thin deep nets" (ICLR 2015): ``||r(f_s) - f_t||^2`` with a learned regressor r.
- Park et al., "Relational knowledge distillation" (CVPR 2019): Huber loss between normalised pairwise distances
  and between triplet angles; weights 25 and 50 as in RepDistiller (Tian et al., ICLR 2020).
- Kornblith et al., "Similarity of neural network representations revisited" (ICML 2019): linear CKA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CKALoss",
    "HintLoss",
    "KDLoss",
    "RKDLoss",
    "cka_loss",
    "kd_loss",
    "linear_cka",
    "rkd_angle_loss",
    "rkd_distance_loss",
]


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str, same_width: bool) -> None:
    """Both (N, D) with the same N (and D where ``same_width``); else a ValueError naming ``what``."""
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(f"{what} takes (N, D) tensors, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: student and teacher have {student.shape[0]} and {teacher.shape[0]} samples")
    if same_width and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{what}: student and teacher widths differ: {student.shape[1]} vs {teacher.shape[1]}")


# ------------------------------------------------------------------------------------------------- Hinton KD
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, averaged over the batch.

    Args:
        student_logits, teacher_logits: (N, C).
        temperature: tau > 0; the tau^2 factor keeps the gradient scale independent of tau.

    Returns:
        A scalar; 0 when both give the same distribution.
    """
    _check_pair(student_logits, teacher_logits, "kd_loss", same_width=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KDLoss(nn.Module):
    """:func:`kd_loss` with a fixed temperature; the teacher logits are detached."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits.detach(), self.temperature)


# ------------------------------------------------------------------------------------------------- FitNet
class HintLoss(nn.Module):
    """FitNet hint: mean squared error between a learned regression of the student feature and the teacher's.

    The regressor maps student width to teacher width: ``nn.Linear`` for (N, D) vectors, a 1x1 ``nn.Conv2d``
    for (N, D, H, W) maps (same H, W on both sides). It is trained with the student and dropped at deployment.

    Args:
        student_dim, teacher_dim: D_s and D_t.
        spatial: True for feature maps, False for pooled vectors.
    """

    def __init__(self, student_dim: int, teacher_dim: int, spatial: bool = False) -> None:
        super().__init__()
        self.spatial = spatial
        self.regressor = (nn.Conv2d(student_dim, teacher_dim, 1) if spatial
                          else nn.Linear(student_dim, teacher_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(N, D_s[, H, W]) and (N, D_t[, H, W]) -> scalar MSE over every element."""
        expected = 4 if self.spatial else 2
        if student.ndim != expected or teacher.ndim != expected:
            raise ValueError(f"HintLoss(spatial={self.spatial}) takes {expected}-D tensors, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        hint = self.regressor(student)
        if hint.shape != teacher.shape:
            raise ValueError(f"HintLoss: regressed student {tuple(hint.shape)} does not match teacher "
                             f"{tuple(teacher.shape)}")
        return F.mse_loss(hint, teacher.detach())


# ------------------------------------------------------------------------------------------------- RKD
def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances divided by their mean over distinct pairs (scale invariance)."""
    dist = torch.cdist(x, x)
    positive = dist[dist > 0]
    if positive.numel() == 0:
        raise ValueError("RKD distance: all samples coincide, so distances cannot be normalised")
    return dist / positive.mean()


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber (smooth L1, beta = 1) between normalised pairwise distances, mean over all N^2 entries.

    Invariant to translating, rotating and uniformly scaling either side.
    """
    _check_pair(student, teacher, "rkd_distance_loss", same_width=False)
    return F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))


def _angles(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N, N): entry [a, b, c] is the cosine of the angle at x_a between x_b - x_a and x_c - x_a.

    Entries with b == a or c == a are 0 (normalising a zero vector gives zero), as in the reference code.
    """
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # [a, b] = unit(x_b - x_a)
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber (smooth L1, beta = 1) between triplet-angle cosines, mean over all N^3 entries."""
    _check_pair(student, teacher, "rkd_angle_loss", same_width=False)
    return F.smooth_l1_loss(_angles(student), _angles(teacher))


class RKDLoss(nn.Module):
    """``w_dist * distance + w_angle * angle`` on (N, D_s) student and (N, D_t) teacher embeddings.

    The widths may differ: RKD compares relations between samples, not the features themselves.
    """

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0) -> None:
        super().__init__()
        self.w_dist, self.w_angle = w_dist, w_angle

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = teacher.detach()
        return self.w_dist * rkd_distance_loss(student, teacher) + self.w_angle * rkd_angle_loss(student, teacher)


# ------------------------------------------------------------------------------------------------- CKA
def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Linear centred kernel alignment of two representations of the same N samples.

    ``CKA = ||Y~^T X~||_F^2 / (||X~^T X~||_F * ||Y~^T Y~||_F)`` with column-centred X~, Y~.

    Args:
        x: (N, D1), y: (N, D2); the widths may differ. N >= 2.

    Returns:
        A scalar in [0, 1]: 1 for representations equal up to an orthogonal transform and isotropic scaling,
        invariant to both; for D1 = D2 = 1 it is the squared Pearson correlation.
    """
    _check_pair(x, y, "linear_cka", same_width=False)
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 samples, got {x.shape[0]}")
    # at least float32, also under autocast: the squared norms overflow fp16. Casting the inputs is not enough,
    # autocast would run the products below in half precision again, so it is switched off here.
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        x = x - x.mean(dim=0, keepdim=True)
        y = y - y.mean(dim=0, keepdim=True)
        cross = torch.linalg.matrix_norm(y.T @ x) ** 2
        norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
        return cross / (norms + eps)


def cka_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - linear_cka(student, teacher)``: 0 when the two representations align."""
    return 1.0 - linear_cka(student, teacher)


class CKALoss(nn.Module):
    """:func:`cka_loss` with the teacher detached (``detach_teacher=True``, as RD does)."""

    def __init__(self, detach_teacher: bool = True) -> None:
        super().__init__()
        self.detach_teacher = detach_teacher

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return cka_loss(student, teacher.detach() if self.detach_teacher else teacher)

"""KD losses against values worked out by hand, their invariances, and bad input refused."""
from __future__ import annotations

import math

import pytest
import torch

from mdbench.losses.kd import (
    CKALoss,
    HintLoss,
    KDLoss,
    RKDLoss,
    cka_loss,
    kd_loss,
    linear_cka,
    rkd_angle_loss,
    rkd_distance_loss,
)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ------------------------------------------------------------------------------------------------- CKA
def test_cka_is_one_for_identical_features():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-7)
    assert cka_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_cka_invariant_to_orthogonal_transform_isotropic_scaling_and_translation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    reference = linear_cka(x, y).item()
    assert 0.0 < reference < 1.0
    transformed = 7.5 * x @ _orthogonal(6, 2) + 3.0  # rotate, scale isotropically, shift
    assert linear_cka(transformed, y).item() == pytest.approx(reference, rel=1e-6)
    assert linear_cka(x, transformed).item() == pytest.approx(1.0, abs=1e-7)
    # ... but not to an anisotropic scaling
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64), x).item() < 0.9


def test_cka_hand_values():
    # 1-D features: CKA is the squared Pearson correlation. x = (1, 2, 3) and y = (1, 0, 0), centred:
    # (-1, 0, 1) and (2/3, -1/3, -1/3); x.y = -1, |x|^2 = 2, |y|^2 = 2/3, so CKA = 1 / (2 * 2/3) = 3/4.
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [0.0]])
    assert linear_cka(x, y).item() == pytest.approx(0.75, abs=1e-6)
    # X = (e1, e2, -e1, -e2) (already centred), Y = its first column: X^T X = 2 I (Frobenius 2 sqrt 2),
    # Y^T Y = 2, Y^T X = (2, 0) with squared norm 4, so CKA = 4 / (2 sqrt 2 * 2) = 1 / sqrt 2.
    big_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert linear_cka(big_x, big_x[:, :1]).item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)


def test_cka_runs_in_float32_under_autocast():
    # RD's co-training step runs under autocast (bf16 on the CPU and on CUDA, fp16 on older GPUs); the products
    # of CKA must not drop to half precision there (fp16 overflows, bf16 keeps ~3 significant digits).
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 16, generator=gen)
    reference = linear_cka(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = linear_cka(x, y)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference, rel=1e-5)


def test_cka_loss_detaches_the_teacher_and_trains_the_student():
    student = torch.randn(8, 3, requires_grad=True)
    teacher = torch.randn(8, 5, requires_grad=True)
    CKALoss()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_cka_refuses_bad_input():
    with pytest.raises(ValueError, match="3 and 4 samples"):
        linear_cka(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka(torch.randn(1, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        linear_cka(torch.randn(3, 2, 2), torch.randn(3, 2))


# ------------------------------------------------------------------------------------------------- KD
def test_kd_hand_value_and_temperature_scaling():
    # teacher (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> (1/2, 1/2):
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(kl, rel=1e-5)
    # at tau = 2 the doubled teacher logits give the same softened distribution, times tau^2 = 4
    assert kd_loss(student, 2 * teacher, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-5)
    # batch mean: a second, identical pair leaves the value unchanged
    assert kd_loss(student.repeat(2, 1), teacher.repeat(2, 1), 1.0).item() == pytest.approx(kl, rel=1e-5)
    assert kd_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_module_detaches_teacher_and_refuses_bad_input():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    KDLoss(temperature=4.0)(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="widths differ"):
        kd_loss(torch.randn(4, 3), torch.randn(4, 2))


# ------------------------------------------------------------------------------------------------- FitNet
def test_hint_loss_hand_value_with_identity_regressor():
    hint = HintLoss(2, 2)
    with torch.no_grad():
        hint.regressor.weight.copy_(torch.eye(2))
        hint.regressor.bias.zero_()
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 6.0]])
    # squared errors 0, 4, 0, 4 over 4 elements
    assert hint(student, teacher).item() == pytest.approx(2.0)


def test_hint_loss_spatial_trains_regressor_not_teacher_and_checks_shapes():
    hint = HintLoss(4, 8, spatial=True)
    student = torch.randn(2, 4, 5, 5, requires_grad=True)
    teacher = torch.randn(2, 8, 5, 5, requires_grad=True)
    hint(student, teacher).backward()
    assert hint.regressor.weight.grad is not None and student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="does not match teacher"):
        hint(torch.randn(2, 4, 5, 5), torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="4-D tensors"):
        hint(torch.randn(2, 4), torch.randn(2, 8))


# ------------------------------------------------------------------------------------------------- RKD
def test_rkd_distance_hand_value():
    # teacher points 0, 1, 3: distances 1, 3, 2 (mean 2) -> 0.5, 1.5, 1; student points 0, 1, 2: distances
    # 1, 2, 1 (mean 4/3) -> 0.75, 1.5, 0.75. Differences 0.25, 0, 0.25 -> Huber 0.03125 each, twice per pair
    # (both orders), over 9 entries: 0.125 / 9.
    teacher = torch.tensor([[0.0], [1.0], [3.0]])
    student = torch.tensor([[0.0], [1.0], [2.0]])
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(0.125 / 9, rel=1e-5)


def test_rkd_angle_hand_value():
    # teacher: right triangle A=(0,0), B=(1,0), C=(0,1); student: collinear (0,0), (1,0), (2,0).
    # Cosines that differ: at A, (B,C) 0 vs 1 -> Huber 0.5; at B, (A,C) 1/sqrt2 vs -1 -> 1.7071 - 0.5;
    # at C, (A,B) 1/sqrt2 vs 1 -> 0.5 * 0.2929^2. Each counted twice, over 27 entries: 3.5 / 27.
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(3.5 / 27, rel=1e-5)


def test_rkd_invariant_to_similarity_transforms_and_widths_may_differ():
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    # the student lives in 6-D: embed the teacher, rotate, scale and shift it
    student = 3.0 * torch.cat([teacher, torch.zeros(10, 2, dtype=torch.float64)], 1) @ _orthogonal(6, 4) - 1.0
    assert RKDLoss()(student, teacher).item() == pytest.approx(0.0, abs=1e-9)
    assert RKDLoss()(torch.randn(10, 6, generator=gen, dtype=torch.float64), teacher).item() > 0.1


def test_rkd_refuses_coincident_points_and_mismatched_batches():
    with pytest.raises(ValueError, match="all samples coincide"):
        rkd_distance_loss(torch.ones(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="4 and 3 samples"):
        RKDLoss()(torch.randn(4, 2), torch.randn(3, 2))

"""DAFT's student (EfficientViT + SAM neck merged with LiteMedSAM's decoder), KD on embeddings, fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mdbench.data.synthetic import SyntheticBoxPromptCases
from mdbench.models import build_model
from mdbench.models.efficientvit_sam import (
    L0_DEPTHS,
    EfficientViTSAMEncoder,
    build_efficientvit_sam,
    efficientvit_sam_from_config,
)
from mdbench.papers.daft import training
from mdbench.papers.daft.evaluation import score_case
from mdbench.papers.daft.inference import segment_case

SMALL = dict(backbone="efficientvit_b0", depths=None, neck_width=32, neck_depth=1, neck_block="mbconv")


@pytest.fixture(scope="module")
def teacher():
    return build_model("litemedsam")


def _cases(kind: str, n: int, split: str = "train") -> list[dict]:
    cases = SyntheticBoxPromptCases(n, kind, split=split, image_size=(128, 128), volume_shape=(8, 48, 48))
    return [{**case, "dims": 3 if kind.startswith("3D") else 2, "name": f"{kind}_{case['id']}.npz"} for case in cases]


def test_student_encoder_output_matches_the_teacher_embedding():
    encoder = EfficientViTSAMEncoder(**SMALL)
    out = encoder(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 256, 64, 64)
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        encoder(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match="efficientvit_b"):
        EfficientViTSAMEncoder(backbone="efficientvit_m0")


def test_l0_backbone_is_efficientvit_l1_with_shallower_stages():
    # EfficientViT-SAM-L0: widths (32, 64, 128, 256, 512), depths (1, 1, 1, 4, 4); timm has only l1 (6, 6)
    l0 = EfficientViTSAMEncoder(depths=L0_DEPTHS, neck_depth=4)
    l1 = EfficientViTSAMEncoder(depths=None, neck_depth=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # each timm stage holds its downsampling block plus `depth` blocks
    assert [len(s.blocks) for s in l0.backbone.stages] == [2, 2, 5, 5]
    assert [len(s.blocks) for s in l1.backbone.stages] == [2, 2, 7, 7]
    assert count(l0.neck) == count(l1.neck)
    assert 26e6 < count(l0.backbone) < 30e6 < count(l1.backbone)  # 27.8 M vs 38.0 M (classifier head pruned)


def test_merge_copies_the_teachers_prompt_encoder_and_decoder(teacher):
    student = build_efficientvit_sam(teacher, **SMALL)
    for part in ("prompt_encoder", "mask_decoder"):
        ours, theirs = getattr(student, part).state_dict(), getattr(teacher, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    next(student.mask_decoder.parameters()).data.add_(1.0)  # a copy: training the student leaves the teacher
    assert not torch.equal(next(student.mask_decoder.parameters()), next(teacher.mask_decoder.parameters()))
    rebuilt = efficientvit_sam_from_config(student.image_encoder.config, student.state_dict())
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(rebuilt.image_encoder(x), student.eval().image_encoder(x))


def test_kd_lowers_the_embedding_mse():
    torch.manual_seed(0)
    # a fixed random "teacher" keeps the test fast; the KD code does not care where the targets come from
    fake_teacher = nn.Sequential(nn.Conv2d(3, 256, 4, stride=4), nn.Tanh()).eval()
    images = torch.rand(2, 3, 256, 256)
    targets = training.embed_images(fake_teacher, images)
    assert targets.dtype == torch.float16 and targets.shape == (2, 256, 64, 64)
    student = EfficientViTSAMEncoder(**SMALL)
    before = training.embedding_mse(student, images, targets)
    history = training.distill_encoder(student, images, targets, epochs=6, lr=3e-3, batch_size=2)
    after = training.embedding_mse(student, images, targets)
    assert len(history.epochs) == 6 and history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    assert after.shape == (2,) and after.mean() < 0.9 * before.mean()
    # per image, the KD loss of a batch of that image alone; their mean, the loss over the whole set
    embedded = training.embed_images(student, images).float()
    for i in range(2):
        assert after[i] == pytest.approx(float(nn.functional.mse_loss(embedded[i], targets[i].float())), rel=1e-6)
    assert after.mean() == pytest.approx(float(nn.functional.mse_loss(embedded, targets.float())), rel=1e-6)
    with pytest.raises(ValueError, match="teacher embeddings"):
        training.distill_encoder(student, images, targets[:1], epochs=1)


def test_finetuning_trains_encoder_and_decoder_but_not_the_prompt_encoder_and_improves_dice(teacher):
    torch.manual_seed(0)
    cases = _cases("2DBox_Endoscopy", 2)
    student = build_efficientvit_sam(teacher, **SMALL)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}

    def mean_dsc() -> float:
        return float(np.mean([score_case(segment_case(student, case), case)["dsc"] for case in cases]))

    dsc_before = mean_dsc()
    history = training.finetune(student, cases, cases[:1], epochs=4, lr=1e-4, batch_size=2, seed=0)
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert not any(name.startswith("prompt_encoder.") for name in changed)
    assert any(name.startswith("image_encoder.") for name in changed)
    assert any(name.startswith("mask_decoder.") for name in changed)
    assert {"train_loss", "val_loss", "train_dice", "train_bce", "train_iou"} <= set(history.epochs[0])
    assert mean_dsc() > dsc_before + 5


def test_data_aware_finetune_copies_the_general_model(teacher):
    general = build_efficientvit_sam(teacher, **SMALL)
    reference = {k: v.clone() for k, v in general.state_dict().items()}
    experts = training.data_aware_finetune(general, {"3D": (_cases("3DBox_MR", 1), [])}, epochs=1, lr=1e-3,
                                           batch_size=4)
    expert, history = experts["3D"]
    assert all(torch.equal(v, general.state_dict()[k]) for k, v in reference.items())  # the general model is kept
    assert expert is not general and len(history.epochs) == 1

"""Slice-wise 3D wrapper: shapes on a tiny timm ViT and on LiteMedSAM's TinyViT, adapter placement, what trains,
frozen BatchNorm statistics, the real encoder reproduced at 256 px, the Dice loss by hand, training beats no training,
and bad input."""
from __future__ import annotations

import pytest
import torch

from mdbench.models import build_model
from mdbench.models.slicewise import MedAdapterConfig, SliceWiseSegmenter, TinyViTSlices, build_slice_backbone
from mdbench.papers.med_tuning import experiment as mt
from mdbench.tuning import apply_method, trainable_report

from conftest import real_dataset

TINY = {"patch_size": 4, "depth": 8, "embed_dim": 24, "num_heads": 2}
T, S, K = 4, 16, 3
DEFAULT_ADAPTER = MedAdapterConfig()  # frozen, so one instance serves every call


def tiny_segmenter(adapter: MedAdapterConfig | None = DEFAULT_ADAPTER, **kwargs) -> SliceWiseSegmenter:
    torch.manual_seed(0)
    backbone = build_slice_backbone("timm:vit_tiny_patch16_224", S, pretrained=False, **{**TINY, **kwargs})
    return SliceWiseSegmenter(backbone, K, T, decoder_channels=8, adapter=adapter)


def test_vit_shapes_and_adapter_placement():
    model = tiny_segmenter()
    assert model(torch.rand(2, 1, T, S, S)).shape == (2, K, T, S, S)
    stages = model.adapters
    assert list(stages) == ["0", "1", "2", "3"] and all(len(s) == 2 for s in stages.values())
    # the last adapter of every stage interacts (blocks 2, 4, 6, 8 here; 3, 6, 9, 12 in ViT-B), on the same grid
    assert [[a.inter_stage for a in s] for s in stages.values()] == [[False, True]] * 4
    assert all(s[1].psi.kernel_size == (1, 1, 1) for s in stages.values())
    assert not any(a.inter_stage for s in tiny_segmenter(MedAdapterConfig(inter_fi=False)).adapters.values()
                   for a in s)


def test_med_tuning_trains_adapters_decoder_and_position_embedding_only():
    model = apply_method(tiny_segmenter(), "head")
    model(torch.rand(1, 1, T, S, S)).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads <= trainable
    assert {n.split(".")[0] for n in trainable} == {"adapters", "decoder", "backbone"}
    assert {n for n in trainable if n.startswith("backbone")} == {"backbone.vit.pos_embed", "backbone.vit.norm.weight",
                                                                  "backbone.vit.norm.bias"}
    report = trainable_report(model)
    frozen_blocks = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n)
    assert report.total - report.trainable == frozen_blocks + sum(
        p.numel() for n, p in model.named_parameters() if "patch_embed" in n)


def test_tinyvit_stages_and_adapters_at_32px():
    encoder = build_model("litemedsam_encoder")  # a fresh copy: the wrapper resets its grid sizes in place
    backbone = TinyViTSlices(encoder.tinyvit, 32, encoder.mdbench_init)
    model = apply_method(SliceWiseSegmenter(backbone, K, 2, decoder_channels=8, adapter=MedAdapterConfig()), "head")
    maps = backbone.forward_stages(torch.rand(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 160, 8, 8), (2, 320, 8, 8)]
    assert backbone.stage_depths == (0, 2, 6, 2) and list(model.adapters) == ["1", "2", "3"]
    # Inter-FI: stage 2 halves the grid (strided 1x3x3 psi from stage 1's width), stage 3 keeps it (1x1x1 psi)
    psi2, psi3 = model.adapters["2"][-1].psi, model.adapters["3"][-1].psi
    assert (psi2.stride, psi2.in_channels) == ((1, 2, 2), int(128 / 6)) and psi3.kernel_size == (1, 1, 1)
    model.train()
    frozen_bn = [m for n, m in model.named_modules()
                 if n.startswith("backbone") and isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen_bn and not any(m.training for m in frozen_bn) and model.decoder.fuse[1].training
    assert model(torch.rand(1, 1, 2, 32, 32)).shape == (1, K, 2, 32, 32)


def test_tinyvit_wrapper_reproduces_the_encoder_at_256px():
    """At its native size, the wrapper's last stage map equals LiteMedSAMEncoder.features()['stage4'] (real weights)."""
    encoder = build_model("litemedsam_encoder")
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = encoder.features(image)["stage4"]
        ours = TinyViTSlices(encoder.tinyvit, 256, encoder.mdbench_init).forward_stages(image)[-1]
    torch.testing.assert_close(ours, expected)


def test_dice_loss_by_hand():
    """Two foreground classes, one voxel each: loss = sum_c 1 - 2 p_c g_c / (sum p_c + sum g_c + 1e-5)."""
    logits = torch.zeros(1, 3, 1, 1, 2)
    logits[0, 1, 0, 0, 0] = 10.0  # voxel 0 confidently class 1
    target = torch.tensor([[[[1, 2]]]])  # voxel 0 class 1, voxel 1 class 2
    p = torch.softmax(logits, dim=1)[0, :, 0, 0]  # (3, 2)
    expected = sum(1 - 2 * p[c, c - 1] / (p[c].sum() + 1 + 1e-5) for c in (1, 2))
    torch.testing.assert_close(mt.dice_loss()(logits, target.unsqueeze(1)), expected)


def test_a_saturated_class_gets_almost_no_gradient_from_the_dice_loss():
    """Why a run can lose a class for good (mt.failed_runs): once a class's logit sits far below the others on
    every voxel, soft Dice alone hardly moves it, where cross-entropy still would."""
    target = torch.tensor([[[[1, 2, 0, 0]]]])  # one voxel of each foreground class
    logits = torch.zeros(1, 3, 1, 1, 4)
    logits[:, 1] = -20.0  # class 1 saturated: softmax probability ~1e-9 everywhere

    def grad_of_class_1(loss_fn) -> float:
        z = logits.clone().requires_grad_(True)
        loss_fn(z).backward()
        return z.grad[:, 1].abs().max().item()

    dice = grad_of_class_1(lambda z: mt.dice_loss()(z, target.unsqueeze(1)))
    cross_entropy = grad_of_class_1(lambda z: torch.nn.functional.cross_entropy(z, target))
    assert dice < 1e-6 * cross_entropy and cross_entropy > 0.1


class Background(torch.nn.Module):
    """Predicts background everywhere: (B, 1, T, H, W) -> (B, 3, T, H, W) logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], K, *x.shape[2:])
        logits[:, 0] = 1
        return logits


def test_missed_classes_score_dice_zero_and_the_volume_diagonal():
    cfg = mt.Config(image_size=16, num_slices=8)
    volumes = mt.load_volumes("synthetic", "test", 2, cfg)
    scores = mt.evaluate(Background(), volumes, "cpu")
    assert scores["dice_mean"] == 0 and scores["pred"].shape == (2, 8, 16, 16)
    assert scores["hd95"] == pytest.approx((8**2 + 16**2 + 16**2) ** 0.5)  # 1 mm voxels


@pytest.mark.real_data
def test_real_hippocampus_volumes_load_for_the_cpu_profile(real_data_dir):
    real_dataset(real_data_dir, "msd_hippocampus")
    cfg = mt.Config(image_size=32, num_slices=16)
    volumes = mt.load_volumes("msd_hippocampus", "train", 2, cfg, str(real_data_dir))
    assert volumes.images.shape == (2, 1, 16, 32, 32) and volumes.labels.shape == (2, 16, 32, 32)
    assert 0 <= volumes.images.min() and volumes.images.max() <= 1
    assert set(volumes.labels.unique().tolist()) == {0, 1, 2}
    assert (volumes.spacing[:, :2] > 1.4).all()  # about 35 x 50 one-mm voxels squeezed into 16 x 32
    assert volumes.dataset == "msd_hippocampus" and len(volumes.checksum) == 64


def test_training_beats_no_training_on_synthetic_volumes():
    tiny = {"patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 4}  # the smoke profile's backbone
    cfg = mt.Config(backbone="timm:vit_tiny_patch16_224", backbone_kwargs=tiny, pretrained=False, image_size=32,
                    num_slices=8, decoder_channels=32, epochs=4, batch_size=1)
    train_set = mt.load_volumes("synthetic", "train", 6, cfg)
    test_set = mt.load_volumes("synthetic", "test", 2, cfg)
    torch.manual_seed(0)
    untrained = mt.evaluate(mt.build_row_model("med_tuning", cfg), test_set, "cpu")
    trained = mt.run("med_tuning", cfg, mt.Volumes.concat([train_set, test_set]), [0])
    assert trained.values["dice_mean"][0] > untrained["dice_mean"] + 20
    assert trained.values["tuned_params_pct"][0] < 100 and trained.values["train_memory_mb"][0] > 0


def test_bad_input_is_refused():
    model = tiny_segmenter()
    with pytest.raises(ValueError, match="built for T=4 slices, got T=5"):
        model(torch.rand(1, 1, 5, S, S))
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, T, 16, 16\)"):
        model(torch.rand(1, 1, T, 32, 32))
    with pytest.raises(ValueError, match="takes volumes"):
        model(torch.rand(1, T, S, S))
    with pytest.raises(ValueError, match="cannot be cut into 4 equal stages"):
        tiny_segmenter(depth=6)
    with pytest.raises(ValueError, match="unknown slice backbone"):
        build_slice_backbone("resnet18", S)
    with pytest.raises(ValueError, match="multiple of 4"):
        TinyViTSlices(torch.nn.Module(), 30, "random init")

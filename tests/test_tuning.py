"""Parameter-efficient baselines: what each method trains (counted by hand), where gradients go, faithfulness of the
injected modules at initialisation, the LiteMedSAM encoder (TinyViT) as a backbone, and bad input."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from mdbench.models import build_model, frozen_norms_to_eval
from mdbench.models.slicewise import TinyViTSlices
from mdbench.tuning import PromptedBlock, PromptedWindowAttention, apply_method, trainable_report

DIM, DEPTH, CLASSES = 32, 2, 3
HEAD = DIM * CLASSES + CLASSES  # the linear classifier


class TinyViTClassifier(nn.Module):
    """A 2-block timm ViT (width 32, random init) + linear head: the smallest backbone/head model."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                          depth=DEPTH, embed_dim=DIM, num_heads=2, num_classes=0)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.fixture
def model() -> TinyViTClassifier:
    torch.manual_seed(0)
    return TinyViTClassifier()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method, cfg, extra", [
    ("head", {}, 0),
    ("linear_probe", {}, 0),
    ("lora", {"r": 4}, DEPTH * (4 * DIM + 3 * DIM * 4)),  # A: r x C, B: 3C x r on each qkv
    ("vpt", {"num_prompts": 3}, DEPTH * 3 * DIM),
    ("adaptformer", {"bottleneck": 8}, DEPTH * ((DIM * 8 + 8) + (8 * DIM + DIM))),
])
def test_trainable_counts_by_hand_and_gradients(model, method, cfg, extra):
    total_before = trainable_report(model).total
    apply_method(model, method, **cfg)
    report = trainable_report(model)
    assert report.trainable == HEAD + extra
    assert report.total == total_before + extra
    assert model.tuning_method == method and model.tuning_config == cfg
    model(images()).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_empty_backbone_name_tunes_a_bare_encoder(model):
    encoder = apply_method(model.backbone, "lora", backbone="", r=2)
    assert trainable_report(encoder).trainable == DEPTH * (2 * DIM + 3 * DIM * 2)


def test_full_trains_everything(model):
    apply_method(model, "head")
    apply_method(model, "full")  # undoes an earlier freeze
    report = trainable_report(model)
    assert report.trainable == report.total and report.percent == 100.0
    assert set(report.by_module["module"]) == {"backbone", "head"}


@pytest.mark.parametrize("method", ["lora", "adaptformer"])
def test_lora_and_adaptformer_start_as_the_pretrained_model(model, method):
    reference = copy.deepcopy(model).eval()
    apply_method(model, method).eval()
    torch.testing.assert_close(model(images()), reference(images()))


def test_vpt_prompts_change_the_output_and_zero_prompts_change_nothing(model):
    block = model.backbone.blocks[0]
    x = torch.randn(2, 16, DIM)
    torch.testing.assert_close(PromptedBlock(block, DIM, 0)(x), block(x))
    reference = copy.deepcopy(model).eval()
    apply_method(model, "vpt", num_prompts=2).eval()
    assert not torch.allclose(model(images()), reference(images()))


@pytest.fixture(scope="module")
def tinyvit() -> nn.Module:
    """LiteMedSAM's TinyViT with random weights (the layout is what matters here) and random attention biases."""
    torch.manual_seed(0)
    encoder = build_model("litemedsam_encoder", pretrained=False)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("attention_biases"):
                p.normal_()
    return encoder


def test_prompted_window_attention_redoes_tinyvit_attention(tinyvit):
    """With no prompts, the re-implemented forward must equal TinyViT's own attention (biases included)."""
    attn = copy.deepcopy(tinyvit.tinyvit.layers[2].blocks[0].attn)
    attn.train()  # TinyViT's Attention.train returns None, so it cannot be chained
    x = torch.randn(3, 14 * 14, 160)
    torch.testing.assert_close(PromptedWindowAttention(attn, 0)(x), attn(x))
    assert not torch.allclose(PromptedWindowAttention(attn, 2)(x), attn(x))


TINYVIT_DIMS = 2 * 128 + 6 * 160 + 2 * 320  # widths of its 10 attention blocks (stages 2-4)


@pytest.mark.parametrize("method, cfg, extra", [
    ("linear_probe", {}, 0),
    ("lora", {"r": 2}, 4 * 2 * TINYVIT_DIMS),  # qkv maps C -> 3C
    ("vpt", {"num_prompts": 4}, 4 * TINYVIT_DIMS),
])
def test_methods_on_the_litemedsam_encoder(tinyvit, method, cfg, extra):
    """The RD use: a classifier on LiteMedSAM's encoder, tuned by name; a 32-px forward checks the gradients."""
    classifier = nn.ModuleDict({"encoder": copy.deepcopy(tinyvit), "head": nn.Linear(320, 2)})
    apply_method(classifier, method, backbone="encoder", **cfg)
    assert trainable_report(classifier).trainable == 320 * 2 + 2 + extra
    slices = TinyViTSlices(classifier["encoder"].tinyvit, 32, "random init")
    pooled = slices.forward_stages(torch.rand(1, 3, 32, 32))[-1].mean(dim=(2, 3))
    classifier["head"](pooled).sum().backward()
    trained = {n for n, p in classifier["encoder"].named_parameters() if p.grad is not None}
    assert trained == {n for n, p in classifier["encoder"].named_parameters() if p.requires_grad}


def test_frozen_batchnorm_stays_in_eval_mode():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    net[1].requires_grad_(False)
    frozen_norms_to_eval(net.train())
    assert not net[1].training and net[3].training
    before = net[1].running_mean.clone()
    net(torch.randn(4, 1, 3, 3) + 5)
    torch.testing.assert_close(net[1].running_mean, before)


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="unknown tuning method 'prefix'"):
        apply_method(model, "prefix")
    with pytest.raises(ValueError, match="unknown options \\['rank'\\]"):
        apply_method(model, "lora", rank=4)
    with pytest.raises(ValueError, match="no submodule 'encoder'"):
        apply_method(model, "head", backbone="encoder")
    with pytest.raises(ValueError, match="LoRA found no target module"):
        apply_method(model, "lora", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="num_prompts >= 1"):
        apply_method(model, "vpt", num_prompts=0)
    with pytest.raises(ValueError, match="no module named 'mlp'"):
        apply_method(nn.ModuleDict({"backbone": nn.Linear(2, 2)}), "adaptformer")

"""Model registry and timm students: every family listed and built by name, names refused clearly, local weights
loaded, random init recorded, no network."""
from __future__ import annotations

import socket
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from mdbench.models import (
    PretrainedWeightsNotFoundWarning,
    UnknownModelError,
    build_model,
    freeze,
    list_models,
    register_model,
    registry,
)


@pytest.fixture
def offline_weights(tmp_path, monkeypatch):
    """An empty MDBENCH_WEIGHTS_DIR, empty HF and torch-hub caches, and sockets that refuse to connect."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("MDBENCH_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return weights_dir


FAMILIES = {"abmil", "clam_mb", "clam_sb", "efficientvit_sam", "feature_reprogrammer", "input_reprogrammer", "litemedsam",
            "litemedsam_encoder", "max_mil", "med_adapter", "projected_student", "slicewise_segmenter",
            "transscan_student", "unet3d"}
BAG = torch.randn(5, 8)  # one MIL bag: 5 instances of 8 features
HEAD = {"in_dim": 8, "hidden": (8, 4), "k_sample": 1}
TINY_VIT = {"patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 2}
SMALL_EFFICIENTVIT = {"backbone": "efficientvit_b0", "depths": None, "neck_width": 16, "neck_depth": 1,
                      "neck_block": "mbconv"}


def test_list_models_names_every_family_and_filters():
    assert set(list_models()) == FAMILIES  # models/__init__ imports every family module
    assert list_models("clam_*") == ["clam_mb", "clam_sb"]
    assert {"timm:resnet18", "timm:resnet10t"} <= set(list_models("timm:resnet1*"))


# name, builder kwargs, inputs, expected output shape(s); each family's documented shapes on a tiny input
FORWARD_CASES = [
    ("clam_sb", HEAD, (BAG,), {"logits": (1, 2), "attention": (1, 5), "instance_scores": (5,)}),
    ("clam_mb", HEAD, (BAG,), {"logits": (1, 2), "attention": (2, 5), "instance_scores": (5,)}),
    ("abmil", HEAD, (BAG,), {"logits": (1, 2), "attention": (1, 5)}),
    ("max_mil", HEAD, (BAG,), {"logits": (1, 2), "instance_scores": (5,)}),
    ("transscan_student", {"variant": "fpd_ts", "teacher_dim": 16, "out_index": 1, "pretrained": False},
     (torch.rand(2, 3, 16, 16),), (2, 16)),
    ("projected_student", {"backbone": "resnet10t", "embed_dim": 8, "pretrained": False},
     (torch.rand(2, 3, 16, 16),), [(2, 512), (2, 8)]),
    ("input_reprogrammer", {"channels": 3, "hidden": 4}, (torch.rand(2, 3, 8, 8),), (2, 3, 8, 8)),
    ("feature_reprogrammer", {"dim": 8, "hidden": 4}, (torch.randn(2, 8),), (2, 8)),
    ("med_adapter", {"dim": 8, "num_slices": 2, "ratio": 2}, (torch.randn(2, 4, 8), (2, 2)), [(2, 4, 8), None]),
    ("slicewise_segmenter", {"backbone": "timm:vit_tiny_patch16_224", "image_size": 8, "num_classes": 3,
                             "num_slices": 2, "decoder_channels": 4, "pretrained": False, **TINY_VIT},
     (torch.rand(1, 1, 2, 8, 8),), (1, 3, 2, 8, 8)),
    ("unet3d", {"channels": (4, 8)}, (torch.rand(1, 1, 4, 4, 4),), (1, 3, 4, 4, 4)),
    ("litemedsam_encoder", {"pretrained": False}, (torch.rand(1, 3, 256, 256),), (1, 256, 64, 64)),
    ("litemedsam", {"pretrained": False}, (torch.rand(1, 3, 256, 256), torch.tensor([[10.0, 10.0, 90.0, 90.0]])),
     [(1, 1, 256, 256), (1, 1)]),
    ("efficientvit_sam", {"pretrained": False, **SMALL_EFFICIENTVIT},
     (torch.rand(1, 3, 256, 256), torch.tensor([[10.0, 10.0, 90.0, 90.0]])), [(1, 1, 256, 256), (1, 1)]),
    ("timm:resnet10t", {"pretrained": False, "num_classes": 2}, (torch.rand(1, 3, 32, 32),), (1, 2)),
]


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if hasattr(out, "_fields"):  # MILOutput
        return {k: tuple(v.shape) for k, v in out._asdict().items() if isinstance(v, torch.Tensor)}
    return [None if o is None else tuple(o.shape) for o in out]


@pytest.mark.parametrize("name, kwargs, inputs, expected", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_each_family_builds_by_name_and_runs_forward(name, kwargs, inputs, expected):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    assert isinstance(model.mdbench_init, str)
    with torch.no_grad():
        shapes = _shapes(model(*inputs))
    if isinstance(expected, dict):
        assert {k: shapes[k] for k in expected} == expected
    else:
        assert shapes == expected


def test_forward_cases_cover_every_family():
    assert {c[0] for c in FORWARD_CASES} >= FAMILIES


def test_architecture_without_weights_refuses_pretrained():
    assert build_model("clam_sb", in_dim=8).mdbench_init == "random init"
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("clam_sb", pretrained=True, in_dim=8)


def test_unknown_name_lists_known_names_and_timm_syntax():
    with pytest.raises(UnknownModelError) as info:
        build_model("litemedsm")
    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert "unknown model 'litemedsm'" in message
    assert all(name in message for name in FAMILIES) and "timm:<name>" in message
    assert "Did you mean: litemedsam" in message


def test_bare_timm_name_suggests_the_prefix():
    with pytest.raises(UnknownModelError, match="Did you mean: timm:resnet18"):
        build_model("resnet18")


def test_unknown_timm_name_suggests_close_timm_names():
    with pytest.raises(UnknownModelError) as info:
        build_model("timm:resnet19x")
    message = str(info.value)
    assert "unknown timm model 'resnet19x'" in message
    assert "timm:resnet18" in message


def test_random_init_with_warning_when_no_local_weights(offline_weights):
    with pytest.warns(PretrainedWeightsNotFoundWarning, match="resnet18.*random init"):
        model = build_model("timm:resnet18")
    assert model.mdbench_init == "random init"
    assert not model.training


def test_pretrained_false_is_silent_random_init(offline_weights):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsNotFoundWarning)
        model = build_model("timm:resnet18", pretrained=False)
    assert model.mdbench_init == "random init"


@pytest.mark.parametrize(
    "name, filename, save",
    [
        ("resnet18", "resnet18.pth", lambda sd, path: torch.save(sd, path)),
        # the default pretrained tag of mobilenetv3_small_100 is lamb_in1k
        ("mobilenetv3_small_100", "mobilenetv3_small_100.lamb_in1k.safetensors", lambda sd, path: save_file(sd, path)),
    ],
)
def test_local_weights_file_is_loaded(offline_weights, name, filename, save):
    torch.manual_seed(123)
    source = timm.create_model(name, pretrained=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = offline_weights / filename
    save(state, path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsNotFoundWarning)
        torch.manual_seed(0)  # a different random init, so equality below means the file was loaded
        model = build_model(f"timm:{name}")
    assert model.mdbench_init == f"pretrained:{path}"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_torch_hub_file_takes_the_file_name_of_a_url_pair(offline_weights, monkeypatch):
    # timm's pretrained url may be a (url, file name) pair; its hub cache keeps the file under that name
    from timm.models import PretrainedCfg

    from mdbench.models import timm_backbones

    cfg = PretrainedCfg(url=("https://example.org/download?id=7", "pair_weights.pth"))
    monkeypatch.setattr(timm_backbones.timm.models, "get_pretrained_cfg", lambda name: cfg)
    assert timm_backbones._torch_hub_file("any").name == "pair_weights.pth"
    cfg = PretrainedCfg(url="https://example.org/weights/plain_weights.pth?raw=1")
    assert timm_backbones._torch_hub_file("any").name == "plain_weights.pth"


def test_local_weights_adapt_to_a_new_head(offline_weights):
    torch.manual_seed(123)
    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), offline_weights / "resnet18.pth")
    model = build_model("timm:resnet18", num_classes=3)
    assert model.mdbench_init.startswith("pretrained:")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (3, 512)


@pytest.mark.parametrize(
    "name, kwargs, out_dim",
    [("resnet18", {"num_classes": 3}, 3), ("mobilenetv3_small_100", {"num_classes": 0}, 1024)],
)
def test_student_output_shapes(name, kwargs, out_dim):
    model = build_model(f"timm:{name}", pretrained=False, **kwargs)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, out_dim)
    if kwargs["num_classes"] == 0:
        assert model.pooled_feature_dim == out_dim


def test_freeze_stops_gradients_and_sets_eval():
    model = build_model("timm:resnet18", pretrained=False).train()
    assert freeze(model) is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_register_refuses_duplicates_and_the_timm_prefix():
    with pytest.raises(ValueError, match="already registered"):
        register_model("litemedsam")(lambda pretrained=True: None)
    with pytest.raises(ValueError, match="reserved for timm"):
        register_model("timm:mine")


def test_builder_must_record_its_init(monkeypatch):
    monkeypatch.setitem(registry._BUILDERS, "no_record", lambda pretrained=True: torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must set model.mdbench_init"):
        build_model("no_record")


def test_features_only_backbone_builds_without_pooled_dim():
    with pytest.warns(Warning):
        model = build_model("timm:resnet18", features_only=True, out_indices=(1, 2))
    maps = model(torch.zeros(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [64, 128] and model.pooled_feature_dim is None

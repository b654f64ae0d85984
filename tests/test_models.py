"""Model registry and timm students: names refused clearly, local weights loaded, random init recorded, no network."""
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
)
from mdbench.models import registry


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


def test_registered_names():
    assert {"litemedsam", "litemedsam_encoder"} <= set(list_models())


def test_unknown_name_lists_known_names_and_timm_syntax():
    with pytest.raises(UnknownModelError) as info:
        build_model("litemedsm")
    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert "unknown model 'litemedsm'" in message
    assert "litemedsam_encoder" in message and "timm:<name>" in message
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

"""Student backbones from timm, with pretrained weights taken only from files already on disk.

Nothing is ever downloaded: timm is always given an explicit local file (``pretrained_cfg_overlay=dict(file=...)``),
so its hub/URL loaders are never reached. Where no file is found the model keeps its random init, a
:class:`PretrainedWeightsNotFoundWarning` says so, and ``model.mdbench_init`` records it for the results.

Where weights are looked for, in order:

1. ``$MDBENCH_WEIGHTS_DIR/<stem><ext>`` with stem = the name as given, ``<architecture>.<tag>``, or ``<architecture>``
   (e.g. ``resnet18``, ``resnet18.a1_in1k``) and ext = ``.safetensors``, ``.pth``, ``.pt``, ``.bin``;
2. the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file name of the timm URL>``);
3. the Hugging Face hub cache, read offline (``huggingface_hub.try_to_load_from_cache``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn

WEIGHTS_ENV = "MDBENCH_WEIGHTS_DIR"
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
RANDOM_INIT = "random init"


class PretrainedWeightsNotFoundWarning(UserWarning):
    """Pretrained weights were asked for but no local file was found, so the model keeps its random init."""


def _weight_stems(name: str) -> list[str]:
    cfg = timm.models.get_pretrained_cfg(name)
    stems = [name]
    if cfg is not None and cfg.architecture:
        if cfg.tag:
            stems.append(f"{cfg.architecture}.{cfg.tag}")
        stems.append(cfg.architecture)
    return list(dict.fromkeys(stems))


def _torch_hub_file(name: str) -> Path | None:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.url:
        return None
    # timm's url is a URL or a (URL, file name) pair, whose file name is the one its hub cache uses
    filename = cfg.url[1] if isinstance(cfg.url, tuple) else Path(urlparse(cfg.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _hf_hub_id(name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None else None


def find_local_weights(name: str) -> Path | None:
    """Path of pretrained weights for timm model ``name`` already on disk, or None; never touches the network."""
    weights_dir = os.environ.get(WEIGHTS_ENV)
    candidates: list[Path | None] = []
    if weights_dir:
        candidates += [Path(weights_dir) / f"{stem}{ext}" for stem in _weight_stems(name) for ext in WEIGHT_EXTENSIONS]
    candidates.append(_torch_hub_file(name))
    for path in candidates:
        if path is not None and path.is_file():
            return path
    hub_id = _hf_hub_id(name)
    if hub_id:
        for filename in _HF_FILENAMES:
            cached = try_to_load_from_cache(hub_id, filename)  # reads the cache folder only
            if isinstance(cached, str):
                return Path(cached)
    return None


def weight_search_locations(name: str) -> list[str]:
    """Short human-readable list of the places :func:`find_local_weights` looks in for timm model ``name``."""
    weights_dir = os.environ.get(WEIGHTS_ENV)
    places = [
        f"{weights_dir}/{{{','.join(_weight_stems(name))}}}{{{','.join(WEIGHT_EXTENSIONS)}}}"
        if weights_dir else f"${WEIGHTS_ENV} (not set)"
    ]
    if _torch_hub_file(name) is not None:
        places.append(str(_torch_hub_file(name)))
    if _hf_hub_id(name):
        places.append(f"the Hugging Face cache of {_hf_hub_id(name)}")
    return places


def build_timm(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    """Build timm model ``name`` (e.g. ``resnet18``, ``vit_tiny_patch16_224``) in eval mode.

    Args:
        name: a timm model name (``timm.is_model(name)`` is True), optionally with a pretrained tag.
        pretrained: load weights from a local file when one is found (see the module docstring); never download.
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes=2``, ``in_chans=1``); timm adapts the
            classifier and stem of a loaded checkpoint to them.

    Returns:
        The timm model, with ``mdbench_init`` = ``"pretrained:<path>"`` or ``"random init"`` and
        ``pooled_feature_dim`` = width of the pooled feature vector (``num_classes=0`` output, or
        ``forward_head(..., pre_logits=True)``): timm's ``head_hidden_size`` where set, else ``num_features``;
        None for ``features_only=True`` models, which return a list of stage maps.
        Input (B, in_chans, H, W) float, output (B, num_classes) logits.
    """
    weights = find_local_weights(name) if pretrained else None
    if weights is not None:
        overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": str(weights)}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        # torch's stub types Module.__setattr__'s value as Tensor | Module; any value is stored
        model.mdbench_init = f"pretrained:{weights}"  # type: ignore[assignment]
    else:
        if pretrained:
            warnings.warn(
                f"no local pretrained weights for timm model {name!r}: building it with random init "
                f"(nothing is downloaded). Looked in: {'; '.join(weight_search_locations(name))}",
                PretrainedWeightsNotFoundWarning,
                stacklevel=3,
            )
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.mdbench_init = RANDOM_INIT  # type: ignore[assignment]  # as above
    if hasattr(model, "feature_info") and not hasattr(model, "num_features"):
        # features_only=True gives a FeatureListNet: a list of stage maps, and no pooled vector
        model.pooled_feature_dim = None  # type: ignore[assignment]  # as above
    else:
        # MobileNetV3-style heads widen the pooled features after num_features; timm records that in head_hidden_size
        model.pooled_feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return model.eval()

"""Teachers (foundation models) and students, built by name.

``build_model("litemedsam")``, ``build_model("litemedsam_encoder")``, ``build_model("timm:resnet18")``.

Every built model carries ``mdbench_init`` ("pretrained:<path>" or "random init") for result records; nothing is
downloaded.
"""
from .registry import UnknownModelError, build_model, freeze, list_models, register_model
from .timm_backbones import PretrainedWeightsNotFoundWarning, find_local_weights
from .litemedsam import (  # importing it registers the LiteMedSAM builders
    LiteMedSAM,
    LiteMedSAMEncoder,
    postprocess_logits,
    preprocess_image,
    resized_hw,
    scale_boxes,
)

__all__ = [
    "LiteMedSAM",
    "LiteMedSAMEncoder",
    "PretrainedWeightsNotFoundWarning",
    "UnknownModelError",
    "build_model",
    "find_local_weights",
    "freeze",
    "list_models",
    "postprocess_logits",
    "preprocess_image",
    "register_model",
    "resized_hw",
    "scale_boxes",
]

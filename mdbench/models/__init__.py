"""Every model of the suite, built by name: ``build_model("litemedsam")``, ``build_model("clam_sb", in_dim=512)``,
``build_model("timm:resnet18")``; :func:`list_models` lists the registered names.

Every built model carries ``mdbench_init`` ("pretrained:<path>" or "random init") for result records; nothing is
downloaded. Each architecture module below registers its builders when imported, so this package imports them all.
"""
from . import (  # noqa: F401  (importing a family registers its builders)
    clam,
    efficientvit_sam,
    litemedsam,
    med_adapter,
    reprogramming,
    slicewise,
    transscan,
    unet3d,
)
from .litemedsam import LiteMedSAM, LiteMedSAMEncoder, postprocess_logits, preprocess_image
from .registry import UnknownModelError, build_model, freeze, frozen_norms_to_eval, list_models, register_model
from .timm_backbones import PretrainedWeightsNotFoundWarning, find_local_weights

__all__ = [
    "LiteMedSAM",
    "LiteMedSAMEncoder",
    "PretrainedWeightsNotFoundWarning",
    "UnknownModelError",
    "build_model",
    "find_local_weights",
    "freeze",
    "frozen_norms_to_eval",
    "list_models",
    "postprocess_logits",
    "preprocess_image",
    "register_model",
]

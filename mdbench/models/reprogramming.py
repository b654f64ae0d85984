"""Reprogramming Distillation (RD; Zhou et al., MICCAI 2024): reprogram a frozen foundation model, co-train a student.

The pieces, with the paper's symbols:

- ``phi``, the reprogrammer, in one of two places (``rd_addendum.md`` section 5.1: where RD's phi acts is not
  known): :class:`InputReprogrammer`, an image -> image residual block in front of the frozen FM,
  ``phi(x) = x + Conv3x3(ReLU(BN(Conv3x3(x))))``, whose gradient flows through the FM; or
  :class:`FeatureReprogrammer`, a residual block on the FM's pooled feature, ``phi(z) = z + W2 ReLU(BN(W1 z))``,
  which leaves the FM forward-only (its features can be cached). Both start as the identity (last layer zero).
- :class:`PooledEncoder` / :class:`FrozenFM` ``F_t``: a foundation-model image encoder followed by global pooling,
  (B, 3, H, W) -> (B, D_t). :func:`build_fm` builds LiteMedSAM's encoder (256x256 input, 256-d) or a cheap stand-in.
- :class:`ProjectedStudent` ``F_s`` and projector ``h``: any backbone (timm by name) -> (B, D_s) -> (B, D_t).

Registered builders: ``input_reprogrammer`` and ``feature_reprogrammer`` (phi), ``projected_student`` (F_s + h).
- the shared classifier ``g``: one ``nn.Linear(D_t, K)`` used by both paths (:class:`ReprogrammingDistillation`).
- :class:`RDObjective` and :class:`RDStep`: the co-training losses and the ``train.fit`` step.

Deployment keeps ``F_s``, ``h`` and ``g`` only (:class:`DeployedStudent`); the FM and ``phi`` are discarded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from mdbench.losses.kd import cka_loss, kd_loss
from mdbench.models.inputs import rgb_batch_at_size
from mdbench.models.registry import RANDOM_INIT, build_model, freeze, register_model
from mdbench.models.timm_backbones import find_local_weights

if TYPE_CHECKING:
    from mdbench.models.litemedsam import LiteMedSAMEncoder

__all__ = [
    "FM_NAMES",
    "DeployedStudent",
    "FeatureReprogrammer",
    "FrozenFM",
    "InputReprogrammer",
    "MeanPool",
    "PooledEncoder",
    "RDObjective",
    "RDOutput",
    "RDStep",
    "ReprogrammingDistillation",
    "ProjectedStudent",
    "Standardise",
    "build_fm",
    "build_projected_student",
]

# "litemedsam": the real encoder at its native 256x256 (gpu profile). "litemedsam_stem": the same pretrained weights
# truncated after the first stage (pointwise patch embedding, two MBConv blocks, patch merging); it is fully
# convolutional, so it runs at the data's own low resolution, which CPU profiles need (the whole encoder costs
# ~75 GFLOPs and 2-3 s per image on one CPU thread, and RD back-propagates through it at every step).
FM_NAMES = ("litemedsam", "litemedsam_stem")


# ------------------------------------------------------------------------------------------------- reprogrammer
@register_model("input_reprogrammer", pretrained_weights=False)
class InputReprogrammer(nn.Module):
    """``phi(x) = x + Conv3x3(ReLU(BN(Conv3x3(x))))``: (B, C, H, W) -> (B, C, H, W), C -> hidden -> C channels.

    The second convolution is zero-initialised, so a new reprogrammer is exactly the identity.
    """

    def __init__(self, channels: int = 3, hidden: int = 32) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels} and {hidden}")
        self.channels = channels
        last = nn.Conv2d(hidden, channels, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            last,
        )
        nn.init.zeros_(last.weight)
        assert last.bias is not None  # built with a bias
        nn.init.zeros_(last.bias)
        self.mdbench_init = RANDOM_INIT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"InputReprogrammer takes (B, {self.channels}, H, W) images, got {tuple(x.shape)}")
        return x + self.body(x)


@register_model("feature_reprogrammer", pretrained_weights=False)
class FeatureReprogrammer(nn.Module):
    """``phi(z) = z + W2 ReLU(BN(W1 z))`` on the frozen FM's pooled features: (B, D) -> (B, D), D -> hidden -> D.

    The feature-space reading of RD's phi (``rd_addendum.md`` section 5.1): the FM runs forward only, so its
    features of the un-reprogrammed images can be computed once. ``W2`` is zero-initialised, so a new
    reprogrammer is exactly the identity, like :class:`InputReprogrammer`.
    """

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got {dim} and {hidden}")
        self.dim = dim
        last = nn.Linear(hidden, dim)
        self.body = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  last)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mdbench_init = RANDOM_INIT

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"FeatureReprogrammer takes (B, {self.dim}) features, got {tuple(z.shape)}")
        return z + self.body(z)


Reprogrammer = InputReprogrammer | FeatureReprogrammer


# ------------------------------------------------------------------------------------------------- foundation model
class MeanPool(nn.Module):
    """Mean over ``dims``: (B, C, H, W) maps with dims (2, 3), or (B, L, C) tokens with dims (1,)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims)


class PooledEncoder(nn.Module):
    """An FM image encoder as a feature extractor: (B, 3, H, W) in [0, 1] -> (B, feature_dim).

    Images are resized (bilinear) to ``input_size`` x ``input_size`` first when it is set and they differ, so the
    same data can feed a student at low resolution and an FM at its native one.

    Args:
        backbone: image -> maps or tokens.
        pool: maps or tokens -> (B, feature_dim).
        feature_dim: D_t.
        input_size: the side the backbone needs, or None for any.
        name: for records ("litemedsam", ...).
        lora_targets: names of the backbone's layers LoRA adapts (``mdbench.tuning``, peft's ``target_modules``).
        has_attention: whether the backbone has attention layers, which VPT's prompts need.
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, feature_dim: int, input_size: int | None,
                 name: str, lora_targets: tuple[str, ...] = ("qkv",), has_attention: bool = True) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, pool
        self.feature_dim, self.input_size, self.name = feature_dim, input_size, name
        self.lora_targets, self.has_attention = lora_targets, has_attention
        self.mdbench_init = getattr(backbone, "mdbench_init", "unknown")  # where the weights came from, for records

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone(rgb_batch_at_size(x, self.input_size, f"the FM {self.name!r}")))


class Standardise(nn.Module):
    """A fixed per-channel standardisation ``(z - mean) / std`` of (..., D) features; the identity by default."""

    mean: torch.Tensor  # (D,) buffers
    std: torch.Tensor

    def __init__(self, dim: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.detach().float())
        self.register_buffer("std", torch.ones(dim) if std is None else std.detach().float())

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardise:
        """The standardisation by the mean and standard deviation of ``features`` (N, D), on their device."""
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Standardise.fit needs features (N >= 2, D), got {tuple(features.shape)}")
        return cls(features.shape[1], features.mean(0), features.std(0).clamp_min(1e-6))

    def then(self, after: Standardise) -> Standardise:
        """``after(self(z))`` as one standardisation, on this one's device."""
        mean, std = after.mean.to(self.mean.device), after.std.to(self.std.device)
        return Standardise(len(self.mean), self.mean + self.std * mean, self.std * std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std


class FrozenFM(nn.Module):
    """A :class:`PooledEncoder` whose weights never train: no parameter requires grad and it stays in eval mode
    even when a parent module calls ``.train()`` (its BatchNorm statistics never move). Gradients still flow through
    its activations to its input, which is how the reprogrammer learns.

    Its features are ``standardise(encoder(x))``, per channel: the identity until :meth:`followed_by` fixes it from a
    dataset's training images. LiteMedSAM's pooled embedding varies over images by ~0.01 per channel around means
    ~4x larger; on it as it comes, a linear head hardly moves in a few hundred AdamW steps and predicts the majority
    class, and a FitNet hint's MSE is mostly the mean (EFCM standardises its teacher's features for the same reason).
    """

    def __init__(self, encoder: PooledEncoder, standardise: Standardise | None = None) -> None:
        super().__init__()
        self.encoder = freeze(encoder)
        device = next(encoder.parameters()).device
        self.standardise = (Standardise(encoder.feature_dim) if standardise is None else standardise).to(device)

    def followed_by(self, standardise: Standardise) -> FrozenFM:
        """This FM (the same encoder, shared) with ``standardise`` applied to its features, e.g.
        ``Standardise.fit`` of its features of a dataset's training images (no labels needed)."""
        if len(standardise.mean) != self.feature_dim:
            raise ValueError(f"a standardisation of {len(standardise.mean)} channels for an FM of {self.feature_dim}")
        return FrozenFM(self.encoder, self.standardise.then(standardise))

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    @property
    def name(self) -> str:
        return self.encoder.name

    def train(self, mode: bool = True) -> FrozenFM:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D_t)."""
        return self.standardise(self.encoder(x))

    @torch.no_grad()
    def cache(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Features of un-reprogrammed images, computed once: (N, 3, H, W) -> (N, D_t) on the CPU.

        Images are moved batch by batch to the FM's device.
        """
        device = next(self.encoder.parameters()).device
        chunks = [self(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
        if not chunks:
            raise ValueError("FrozenFM.cache got no images")
        return torch.cat(chunks)


def build_fm(name: str, input_size: int | None = None) -> PooledEncoder:
    """Build a foundation-model encoder (trainable; wrap it in :class:`FrozenFM` to freeze it).

    Args:
        name: ``"litemedsam"`` (LiteMedSAM's TinyViT encoder, 256x256 input, pooled 256-d embedding),
            ``"litemedsam_stem"`` (its first stage, any input size, pooled 128-d; a cheap stand-in for CPU runs)
            or ``"timm:<name>"`` (a timm backbone whose pretrained weights are on disk; pooled by timm).
        input_size: images are resized to this side first; LiteMedSAM's full encoder always takes 256.

    Returns:
        A :class:`PooledEncoder` with ``mdbench_init`` set (where the weights came from).
    """
    encoder: nn.Module  # where the weights come from (its mdbench_init)
    if name == "litemedsam":
        if input_size not in (None, 256):
            raise ValueError(f"LiteMedSAM's encoder takes 256x256 input only, got input_size={input_size}")
        # the builder registered as litemedsam_encoder returns a LiteMedSAMEncoder
        encoder = cast("LiteMedSAMEncoder", build_model("litemedsam_encoder"))
        fm = PooledEncoder(encoder, MeanPool((2, 3)), encoder.pooled_feature_dim, 256, name)
    elif name == "litemedsam_stem":
        encoder = cast("LiteMedSAMEncoder", build_model("litemedsam_encoder"))
        tinyvit = encoder.tinyvit
        stem = nn.Sequential(tinyvit.patch_embed, tinyvit.layers[0])  # -> (B, H/2 * W/2, 128) tokens
        # no attention here: LoRA adapts the pointwise convolutions of the MBConv blocks and the patch merging
        fm = PooledEncoder(stem, MeanPool((1,)), tinyvit.layers[0].downsample.conv3.c.out_channels, input_size, name,
                           lora_targets=("conv1.c", "conv3.c"), has_attention=False)
    elif name.startswith("timm:"):
        if find_local_weights(name[len("timm:"):]) is None:
            raise ValueError(f"{name} has no pretrained weights on disk: a randomly initialised network is no "
                             "foundation model (set MDBENCH_WEIGHTS_DIR, see mdbench.models.timm_backbones)")
        encoder = build_model(name, num_classes=0)
        # build_timm records the pooled width; an int for a model that is not features_only
        fm = PooledEncoder(encoder, nn.Identity(), cast(int, encoder.pooled_feature_dim), input_size, name,
                           has_attention=any(hasattr(m, "qkv") for m in encoder.modules()))
    else:
        raise ValueError(f"unknown foundation model {name!r}; choose one of {FM_NAMES} or 'timm:<name>'")
    fm.mdbench_init = encoder.mdbench_init
    return fm.eval()


# ------------------------------------------------------------------------------------------------- student
class ProjectedStudent(nn.Module):
    """Student backbone ``F_s`` and projector ``h`` into the FM's feature space (needed because ``g`` is shared).

    Args:
        backbone: (B, 3, H, W) -> (B, feature_dim) pooled features (e.g. a timm model with ``num_classes=0``).
        feature_dim: D_s.
        embed_dim: D_t, the shared classifier's input width.
        projector: ``"linear"`` (``Linear(D_s, D_t)``) or ``"mlp"`` (``Linear-BN-ReLU-Linear``).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embed_dim: int, projector: str = "linear") -> None:
        super().__init__()
        self.backbone, self.feature_dim, self.embed_dim = backbone, feature_dim, embed_dim
        self.projector: nn.Linear | nn.Sequential
        if projector == "linear":
            self.projector = nn.Linear(feature_dim, embed_dim)
        elif projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim),
                                           nn.ReLU(inplace=True), nn.Linear(feature_dim, embed_dim))
        else:
            raise ValueError(f"projector must be 'linear' or 'mlp', got {projector!r}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> backbone features (B, D_s) and projected features (B, D_t)."""
        features = self.backbone(x)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"the student backbone gave {tuple(features.shape)}, expected (B, {self.feature_dim})")
        return features, self.projector(features)


@register_model("projected_student")
def build_projected_student(backbone: str = "resnet18", embed_dim: int = 256, image_size: int | None = None,
                            pretrained: bool = True, projector: str = "linear") -> ProjectedStudent:
    """A timm backbone by name (``resnet18``, ``mobilenetv3_small_100``, ``vit_tiny_patch16_224``, ...) with a projector
    into the FM's ``embed_dim`` features: (B, 3, H, W) -> ((B, D_s), (B, embed_dim)).

    Pretrained weights are used where they are on disk (else random init with a warning); ``mdbench_init`` of
    the result says which. ViTs are built for ``image_size`` (their position embedding depends on it).
    """
    kwargs = {"num_classes": 0}
    if image_size is not None and backbone.startswith(("vit_", "deit_")):
        kwargs["img_size"] = image_size
    body = build_model(f"timm:{backbone}", pretrained=pretrained, **kwargs)
    # build_timm records the pooled width; an int for a model that is not features_only
    student = ProjectedStudent(body, cast(int, body.pooled_feature_dim), embed_dim, projector)
    student.mdbench_init = body.mdbench_init
    return student


class DeployedStudent(nn.Module):
    """What RD deploys: ``g(h(F_s(x)))``, (B, 3, H, W) -> (B, K) logits."""

    def __init__(self, student: ProjectedStudent, classifier: nn.Linear) -> None:
        super().__init__()
        self.student, self.classifier = student, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.student(x)[1])


# ------------------------------------------------------------------------------------------------- co-training
class RDOutput(NamedTuple):
    """One co-training forward pass: logits (B, K) and features (B, D_t) of both paths."""

    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    teacher_features: torch.Tensor
    student_features: torch.Tensor


class ReprogrammingDistillation(nn.Module):
    """Teacher path ``g(F_t(phi(x)))`` (or ``g(phi(F_t(x)))``) and student path ``g(h(F_s(x)))`` with one shared classifier ``g``.

    Args:
        fm: the frozen foundation model F_t.
        student: F_s with its projector h (``student.embed_dim`` must equal ``fm.feature_dim``).
        num_classes: K.
        reprogrammer: phi on the FM's input (:class:`InputReprogrammer`) or on its pooled feature
            (:class:`FeatureReprogrammer`), or None for the ablation "RD without reprogramming" (phi = identity).
            Without phi or with phi on the feature, the FM's features ``F_t(x)`` do not depend on anything
            trainable, so they can be passed in precomputed.
    """

    def __init__(self, fm: FrozenFM, student: ProjectedStudent, num_classes: int,
                 reprogrammer: Reprogrammer | None = None) -> None:
        super().__init__()
        if student.embed_dim != fm.feature_dim:
            raise ValueError(f"the student projects to {student.embed_dim} features but the FM gives "
                             f"{fm.feature_dim}: build the student with embed_dim={fm.feature_dim}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.fm, self.student, self.reprogrammer = fm, student, reprogrammer
        self.classifier = nn.Linear(fm.feature_dim, num_classes)

    def teacher_features(self, x: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        """F_t(phi(x)) or phi(F_t(x)): (B, 3, H, W) -> (B, D_t); ``cached`` F_t(x) (B, D_t) stands in for the FM
        unless phi acts on its input."""
        if isinstance(self.reprogrammer, InputReprogrammer):
            if cached is not None:
                raise ValueError("cached FM features are not valid with a reprogrammer of the FM's input: "
                                 "F_t(phi(x)) changes as phi trains")
            return self.fm(self.reprogrammer(x))
        features = cached if cached is not None else self.fm(x)
        return features if self.reprogrammer is None else self.reprogrammer(features)

    def forward(self, x: torch.Tensor, cached_teacher_features: torch.Tensor | None = None) -> RDOutput:
        z_t = self.teacher_features(x, cached_teacher_features)
        _, z_s = self.student(x)
        return RDOutput(self.classifier(z_t), self.classifier(z_s), z_t, z_s)

    def deployed(self) -> DeployedStudent:
        """The deployable student ``g(h(F_s(x)))`` (shares its modules with this one)."""
        return DeployedStudent(self.student, self.classifier)


class RDObjective(nn.Module):
    """``L = CE(l_t, y) + CE(l_s, y) + alpha * KD(l_s, l_t) + beta * (1 - CKA(z_s, z_t))``.

    The KD term uses the detached teacher logits with temperature tau (the teacher is not pulled towards the
    student); the CKA term the detached teacher features. ``alpha`` and ``beta`` are multiplied by the ``scale``
    passed to :meth:`forward` (the linear decay of :class:`RDStep`).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        if alpha < 0 or beta < 0 or temperature <= 0:
            raise ValueError(f"need alpha >= 0, beta >= 0, temperature > 0; got {alpha}, {beta}, {temperature}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, out: RDOutput, y: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Returns the individual losses ``ce_teacher``, ``ce_student``, ``kd``, ``cka`` and their weighted
        ``total``; ``cka`` is only computed when beta > 0 (CKA needs a batch of at least 2)."""
        losses = {
            "ce_teacher": F.cross_entropy(out.teacher_logits, y),
            "ce_student": F.cross_entropy(out.student_logits, y),
            "kd": kd_loss(out.student_logits, out.teacher_logits.detach(), self.temperature),
        }
        total = losses["ce_teacher"] + losses["ce_student"] + scale * self.alpha * losses["kd"]
        if self.beta > 0:
            losses["cka"] = cka_loss(out.student_features, out.teacher_features.detach())
            total = total + scale * self.beta * losses["cka"]
        losses["total"] = total
        return losses


class RDStep:
    """``train.fit`` step for :class:`ReprogrammingDistillation` on batches ``(x, y)`` or ``(x, y, cached F_t(x))``.

    Args:
        objective: the losses.
        total_steps: the run's number of optimizer steps; with ``decay`` the KD and CKA weights fall linearly
            from their full value at step 0 to 0 at ``total_steps`` (DRD's schedule).
        decay: whether to decay.

    Logs every individual loss; counts optimizer steps only in training mode.
    """

    def __init__(self, objective: RDObjective, total_steps: int, decay: bool = True) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.objective, self.total_steps, self.decay = objective, total_steps, decay
        self.step = 0

    def scale(self) -> float:
        return max(0.0, 1.0 - self.step / self.total_steps) if self.decay else 1.0

    def __call__(self, model: ReprogrammingDistillation, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, *cached = batch
        out = model(x, cached[0] if cached else None)
        losses = self.objective(out, y, self.scale())
        if model.training:
            self.step += 1
        return losses["total"], {k: v.detach() for k, v in losses.items() if k != "total"}

"""CLAM (Lu et al., Nat. Biomed. Eng. 2021) and its MIL baselines in one file, after ``mahmoodlab/CLAM``.

A bag is one slide (or image, or cell set) given as instance features ``h`` of shape (N, D); batch size is 1
bag, as in CLAM. Every head returns a :class:`MILOutput` so one training step serves them all.

- :class:`CLAM`: patch projection ``D -> hidden[0]`` (ReLU, dropout), gated attention
  ``a_k = W_c (tanh(V h_k) * sigmoid(U h_k))`` with M branches (CLAM-SB: M = 1; CLAM-MB: M = n_classes), softmax
  over the N instances, attention pooling, and a bag classifier (SB: one linear layer; MB: one 1-logit layer per
  class on its own pooled vector). Instance-level clustering: per class a 2-way instance classifier, trained on
  the top-B (pseudo-label 1) and bottom-B (pseudo-label 0) instances by attention of the bag's own class, and, for
  mutually exclusive classes (``subtyping``), on the top-B instances of every other class (pseudo-label 0).
  Total loss ``c1 * CE(bag) + (1 - c1) * L_inst`` with ``c1 = 0.7`` (:func:`mil_loss`).
- ABMIL (Ilse et al. 2018): CLAM-SB without instance clustering (:func:`abmil`).
- :class:`MaxMIL`: max-instance MIL (CLAM's ``MIL_fc``/``MIL_fc_mc``): per-instance classifier, the bag
  prediction is the logits of the single most confident instance.

Registered builders (all take CLAM's keyword arguments, so one call builds any of them):
``build_model("clam_sb" | "clam_mb" | "abmil" | "max_mil", in_dim=D, n_classes=C, ...)``. MIL heads are always
trained from scratch (random init).

CLAM's files are not a pip package, so the heads are written here, keeping its layer layout and defaults.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mdbench.losses.mil import SmoothTop1SVM
from mdbench.models.registry import RANDOM_INIT, register_model

__all__ = [
    "CLAM",
    "GatedAttention",
    "MILOutput",
    "MaxMIL",
    "abmil",
    "clam_mb",
    "clam_sb",
    "max_mil",
    "mil_loss",
    "pseudo_labels",
]


class MILOutput(NamedTuple):
    """What every MIL head returns for one bag.

    logits: (1, C) bag logits. attention: (M, N) attention over the instances (softmax over N; M = 1 for
    CLAM-SB/ABMIL, C for CLAM-MB), None for :class:`MaxMIL`. instance_scores: (N,) a per-instance score for
    heatmaps (attention of the predicted class's branch, or max-MIL's positive-class probability).
    instance_loss: scalar instance-clustering loss when a label was given and the head clusters, else None.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None
    instance_scores: torch.Tensor
    instance_loss: torch.Tensor | None


def _xavier_init(module: nn.Module) -> None:
    """CLAM's ``initialize_weights``: Xavier-normal Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_bag(h: torch.Tensor, in_dim: int) -> torch.Tensor:
    """(N, D) or (1, N, D) bag -> (N, D); refuses anything else with the shape it got."""
    if h.ndim == 3 and h.shape[0] == 1:
        h = h[0]
    if h.ndim != 2 or h.shape[1] != in_dim or h.shape[0] < 1:
        raise ValueError(f"a bag must be (N, {in_dim}) instance features with N >= 1 (or (1, N, {in_dim})), "
                         f"got {tuple(h.shape)}")
    return h


class GatedAttention(nn.Module):
    """CLAM's ``Attn_Net_Gated`` (or ``Attn_Net`` with ``gated=False``): (N, L) -> (N, M) raw attention scores.

    ``a = W_c (tanh(V h) * sigmoid(U h))``, V, U: L -> D, W_c: D -> M; dropout after tanh and sigmoid.
    """

    def __init__(self, in_dim: int = 512, hidden: int = 256, n_branches: int = 1, dropout: float = 0.25,
                 gated: bool = True) -> None:
        super().__init__()
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.attention_a = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), *drop)
        self.attention_b = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), *drop) if gated else None
        self.attention_c = nn.Linear(hidden, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention_a(h)
        if self.attention_b is not None:
            a = a * self.attention_b(h)
        return self.attention_c(a)


def pseudo_labels(attention: torch.Tensor, k: int, in_class: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAM's instance pseudo-labels from one attention row.

    Args:
        attention: (N,) attention scores of one branch (softmaxed or raw: the ranking is the same).
        k: B, instances taken from each end (``1 <= k``; ``2k <= N`` for ``in_class``, ``k <= N`` otherwise).
        in_class: the branch of the bag's own class: top-k get label 1 and bottom-k label 0 (``inst_eval``).
            Otherwise (another class, subtyping only): top-k get label 0 (``inst_eval_out``).

    Returns:
        (indices (2k,) or (k,), targets of the same shape, int64), top instances first, each end in order
        of decreasing (top) or increasing (bottom) attention.
    """
    if attention.ndim != 1:
        raise ValueError(f"attention must be one (N,) row, got shape {tuple(attention.shape)}")
    n = attention.shape[0]
    need = 2 * k if in_class else k
    if k < 1 or need > n:
        raise ValueError(f"cannot take k={k} instances from each end of a bag of {n} (need 1 <= k, {need} <= N)")
    top = attention.topk(k).indices
    if not in_class:
        return top, torch.zeros(k, dtype=torch.long, device=attention.device)
    bottom = (-attention).topk(k).indices
    targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(attention.device)
    return torch.cat([top, bottom]), targets


class CLAM(nn.Module):
    """CLAM-SB (``multi_branch=False``) or CLAM-MB (``multi_branch=True``); ABMIL with ``instance_loss=None``.

    Args:
        in_dim: D, instance feature width (1024 for CLAM's truncated ResNet-50).
        n_classes: C bag classes.
        hidden: (projection width, attention width): CLAM's "small" is (512, 256), "big" (512, 384).
        dropout: after the projection and inside the attention net (CLAM's ``--drop_out 0.25``).
        gated: gated attention (CLAM default) or plain tanh attention.
        multi_branch: one attention branch and one bag classifier per class (CLAM-MB).
        k_sample: B, pseudo-labelled instances from each end of the attention ranking (CLAM ``--B 8``); bags
            smaller than 2B use ``N // 2`` (CLAM itself would fail on them), bags of one instance skip it.
        subtyping: classes are mutually exclusive: also train the other classes' instance classifiers on their
            top-B instances as negatives, and average the instance loss over classes.
        instance_loss: ``"svm"`` (smooth top-1 SVM, CLAM's ``--inst_loss svm``), ``"ce"``, or None (no instance
            clustering: ABMIL when ``multi_branch=False``).

    Input (N, D) instance features of one bag (or (1, N, D)); output :class:`MILOutput`. The instance loss is
    computed whenever ``label`` is passed and ``instance_loss`` is not None.
    """

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, hidden: tuple[int, int] = (512, 256),
                 dropout: float = 0.25, gated: bool = True, multi_branch: bool = False, k_sample: int = 8,
                 subtyping: bool = False, instance_loss: str | None = "svm") -> None:
        super().__init__()
        if n_classes < 2 or k_sample < 1:
            raise ValueError(f"need n_classes >= 2 and k_sample >= 1, got {n_classes} and {k_sample}")
        if instance_loss not in ("svm", "ce", None):
            raise ValueError(f"instance_loss must be 'svm', 'ce' or None, got {instance_loss!r}")
        self.in_dim, self.n_classes, self.k_sample = in_dim, n_classes, k_sample
        self.multi_branch, self.subtyping = multi_branch, subtyping
        width, attn_width = hidden
        self.fc = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(width, attn_width, n_classes if multi_branch else 1, dropout, gated)
        self.classifiers: nn.ModuleList | nn.Linear  # one Linear(width, 1) per class with multi_branch
        if multi_branch:
            self.classifiers = nn.ModuleList([nn.Linear(width, 1) for _ in range(n_classes)])
        else:
            self.classifiers = nn.Linear(width, n_classes)
        self.instance_loss_fn: nn.Module | None = None
        self.instance_classifiers = nn.ModuleList()
        if instance_loss is not None:
            self.instance_classifiers = nn.ModuleList([nn.Linear(width, 2) for _ in range(n_classes)])
            self.instance_loss_fn = SmoothTop1SVM() if instance_loss == "svm" else nn.CrossEntropyLoss()
        _xavier_init(self)
        self.mdbench_init = RANDOM_INIT

    def forward(self, h: torch.Tensor, label: int | torch.Tensor | None = None) -> MILOutput:
        h = self.fc(_check_bag(h, self.in_dim))  # (N, width)
        attention = F.softmax(self.attention(h).T, dim=1)  # (M, N)
        pooled = attention @ h  # (M, width)
        if self.multi_branch:
            assert isinstance(self.classifiers, nn.ModuleList)  # so built for multi_branch
            logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)])[None]  # (1, C)
        else:
            logits = self.classifiers(pooled)  # (1, C)
        predicted = int(logits.argmax(dim=1))
        scores = attention[predicted if self.multi_branch else 0]
        instance_loss = None
        if label is not None and self.instance_loss_fn is not None:
            instance_loss = self._instance_loss(h, attention, int(label))
        return MILOutput(logits, attention, scores, instance_loss)

    def _instance_loss(self, h: torch.Tensor, attention: torch.Tensor, label: int) -> torch.Tensor:
        """Sum over the instance branches CLAM trains for a bag of class ``label`` (mean over classes when
        subtyping)."""
        if not 0 <= label < self.n_classes:
            raise ValueError(f"bag label {label} is outside [0, {self.n_classes})")
        k = min(self.k_sample, h.shape[0] // 2)
        total = h.new_zeros(())
        if k < 1:
            return total
        loss_fn = self.instance_loss_fn
        assert loss_fn is not None  # forward computes the instance loss only with an instance_loss
        for c, classifier in enumerate(self.instance_classifiers):
            in_class = c == label
            if not in_class and not self.subtyping:
                continue
            row = attention[c if self.multi_branch else 0]
            index, targets = pseudo_labels(row, k, in_class)
            total = total + loss_fn(classifier(h[index]), targets)
        return total / self.n_classes if self.subtyping else total


class MaxMIL(nn.Module):
    """Max-instance MIL (CLAM's ``MIL_fc`` / ``MIL_fc_mc``): (N, D) -> bag logits of the top instance.

    Each instance is projected (``D -> hidden``, ReLU, dropout) and classified into C classes. Binary: the bag's
    logits are those of the instance with the highest positive-class probability; multi-class: of the instance
    holding the largest probability over all instances and classes. Trained with CE on those logits.
    """

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"need n_classes >= 2, got {n_classes}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_classes)
        _xavier_init(self)
        self.mdbench_init = RANDOM_INIT

    def forward(self, h: torch.Tensor, label: int | torch.Tensor | None = None) -> MILOutput:
        logits = self.classifier(self.fc(_check_bag(h, self.in_dim)))  # (N, C)
        probs = logits.softmax(dim=1)
        if self.n_classes == 2:
            top = int(probs[:, 1].argmax())
            scores = probs[:, 1]
        else:
            top = int(probs.flatten().argmax()) // self.n_classes
            scores = probs.max(dim=1).values
        return MILOutput(logits[top:top + 1], None, scores, None)


@register_model("clam_sb", pretrained_weights=False)
def clam_sb(in_dim: int = 1024, n_classes: int = 2, **kwargs) -> CLAM:
    """CLAM single-branch: one attention branch shared by all classes (the CLAM README's default)."""
    return CLAM(in_dim, n_classes, multi_branch=False, **kwargs)


@register_model("clam_mb", pretrained_weights=False)
def clam_mb(in_dim: int = 1024, n_classes: int = 2, **kwargs) -> CLAM:
    """CLAM multi-branch: one attention branch and bag classifier per class (the CLAM paper's model)."""
    return CLAM(in_dim, n_classes, multi_branch=True, **kwargs)


@register_model("abmil", pretrained_weights=False)
def abmil(in_dim: int = 1024, n_classes: int = 2, **kwargs) -> CLAM:
    """Gated-attention MIL (Ilse et al. 2018): CLAM-SB without instance clustering (``--no_inst_cluster``)."""
    return CLAM(in_dim, n_classes, multi_branch=False, instance_loss=None, **kwargs)


@register_model("max_mil", pretrained_weights=False)
def max_mil(in_dim: int = 1024, n_classes: int = 2, hidden: tuple[int, int] = (512, 256), dropout: float = 0.25,
            **_clam_only) -> MaxMIL:
    """:class:`MaxMIL` taking CLAM's keyword arguments, so one call builds any head: its projection width is
    ``hidden[0]``; CLAM's attention and clustering options (``k_sample``, ``subtyping``, ...) do not apply."""
    return MaxMIL(in_dim, n_classes, hidden[0], dropout)


def mil_loss(output: MILOutput, label: int | torch.Tensor, bag_weight: float = 0.7) -> torch.Tensor:
    """CLAM's total loss ``c1 * CE(bag logits, label) + (1 - c1) * instance loss``; plain CE without one."""
    if not 0 <= bag_weight <= 1:
        raise ValueError(f"bag_weight must lie in [0, 1], got {bag_weight}")
    target = torch.as_tensor(label, device=output.logits.device).long().reshape(1)
    bag = F.cross_entropy(output.logits, target)
    if output.instance_loss is None:
        return bag
    return bag_weight * bag + (1 - bag_weight) * output.instance_loss

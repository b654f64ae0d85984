"""CLAM (Lu et al., Nat. Biomed. Eng. 2021) and its MIL baselines in one file, after ``mahmoodlab/CLAM``.

A bag is one slide (or image, or cell set) given as instance features ``h`` of shape (N, D); CLAM trains on one
bag per step. Every head also takes a batch of bags zero-padded to one size, ``(B, N, D)`` with each bag's length,
and computes every bag as it would alone (the padding is masked out), so that many bags can share a GPU step.
Every head returns a :class:`MILOutput` so one training step serves them all.

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

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mdbench.losses.mil import SmoothTop1SVM
from mdbench.models.inputs import host_to_device
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
    """What every MIL head returns for one bag (N, D), or for a batch of B bags (B, N, D) with a leading B.

    logits: (1, C) bag logits, (B, C) for a batch. attention: (M, N) attention over the instances (softmax over N;
    M = 1 for CLAM-SB/ABMIL, C for CLAM-MB; (B, M, N), zero on padding), None for :class:`MaxMIL`.
    instance_scores: (N,) or (B, N) a per-instance score for heatmaps (attention of the predicted class's branch,
    or max-MIL's positive-class probability; padding holds no meaningful value). instance_loss: the
    instance-clustering loss, a scalar or (B,) per bag, when labels were given and the head clusters, else None.
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


class _Bags(NamedTuple):
    h: torch.Tensor  # (B, N, D)
    mask: torch.Tensor | None  # (B, N) True on real instances; None when no bag is padded
    lengths: list[int]  # instances per bag, on the host
    single: bool  # one (N, D) bag was given: outputs drop the leading B


def _check_bags(h: torch.Tensor, in_dim: int, lengths: Sequence[int] | None) -> _Bags:
    """One (N, D) bag, or (B, N, D) bags zero-padded to N with ``lengths`` (host ints, default all N); refuses
    anything else with the shape it got."""
    single = h.ndim == 2
    if single:
        h = h[None]
    if h.ndim != 3 or h.shape[2] != in_dim or min(h.shape[:2]) < 1:
        raise ValueError(f"a bag must be (N, {in_dim}) instance features with N >= 1 (or a batch (B, N, {in_dim})), "
                         f"got {tuple(h.shape)}")
    n = h.shape[1]
    sizes = [n] * len(h) if lengths is None else [int(x) for x in lengths]
    if len(sizes) != len(h) or not all(1 <= x <= n for x in sizes):
        raise ValueError(f"{len(h)} bags padded to {n} instances need as many lengths in [1, {n}], got {sizes}")
    mask = None
    if min(sizes) < n:
        mask = torch.arange(n, device=h.device)[None] < host_to_device(sizes, h.device)[:, None]
    return _Bags(h, mask, sizes, single)


def _bag_labels(label: int | Sequence[int] | torch.Tensor, n_bags: int, n_classes: int) -> list[int]:
    """The bags' classes as host ints (a CUDA tensor waits for the GPU here: pass host labels on a hot path)."""
    if isinstance(label, torch.Tensor):
        labels = label.reshape(-1).tolist()
    else:
        labels = list(label) if isinstance(label, Sequence) else [label]
    if len(labels) != n_bags:
        raise ValueError(f"{n_bags} bags need as many labels, got {len(labels)}")
    for value in labels:
        if not 0 <= int(value) < n_classes:
            raise ValueError(f"bag label {value} is outside [0, {n_classes})")
    return [int(value) for value in labels]


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


def pseudo_labels(attention: torch.Tensor, k: int, in_class: bool, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAM's instance pseudo-labels from one attention row, or from each row of a batch of bags.

    Args:
        attention: (N,) attention scores of one branch, or (G, N) one row per bag (softmaxed or raw: the ranking
            is the same).
        k: B, instances taken from each end (``1 <= k``; ``2k <= N`` for ``in_class``, ``k <= N`` otherwise).
        in_class: the branch of the bag's own class: top-k get label 1 and bottom-k label 0 (``inst_eval``).
            Otherwise (another class, subtyping only): top-k get label 0 (``inst_eval_out``).
        mask: (G, N) True on real instances of zero-padded bags (each holding at least 2k, or k, of them);
            padding is never picked.

    Returns:
        (indices (2k,) or (k,), targets of the same shape, int64), top instances first, each end in order
        of decreasing (top) or increasing (bottom) attention; (G, 2k) or (G, k) each for (G, N) rows.
    """
    if attention.ndim not in (1, 2):
        raise ValueError(f"attention must be one (N,) row or (G, N) rows, got shape {tuple(attention.shape)}")
    n = attention.shape[-1]
    need = 2 * k if in_class else k
    if k < 1 or need > n:
        raise ValueError(f"cannot take k={k} instances from each end of a bag of {n} (need 1 <= k, {need} <= N)")
    if mask is not None:  # padding ranks below every real instance at the top and above it at the bottom
        attention = attention.masked_fill(~mask, float("-inf"))
    top = attention.topk(k, dim=-1).indices
    if not in_class:
        return top, torch.zeros_like(top)
    low = attention if mask is None else attention.masked_fill(~mask, float("inf"))
    picked = torch.cat([top, (-low).topk(k, dim=-1).indices], dim=-1)
    targets = torch.cat([torch.ones(k, dtype=torch.long, device=attention.device),
                         torch.zeros(k, dtype=torch.long, device=attention.device)])
    return picked, targets.expand_as(picked)


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

    Input (N, D) instance features of one bag, or a batch (B, N, D) of bags zero-padded to N with their
    ``lengths``; output :class:`MILOutput`. The instance loss is computed whenever ``label`` is passed (one int,
    or one per bag) and ``instance_loss`` is not None.
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
            # per instance: :meth:`_branch_loss` averages them per bag
            self.instance_loss_fn = (SmoothTop1SVM(reduction="none") if instance_loss == "svm"
                                     else nn.CrossEntropyLoss(reduction="none"))
        _xavier_init(self)
        self.mdbench_init = RANDOM_INIT

    def forward(self, h: torch.Tensor, label: int | Sequence[int] | torch.Tensor | None = None,
                lengths: Sequence[int] | None = None) -> MILOutput:
        bags = _check_bags(h, self.in_dim, lengths)
        x = self.fc(bags.h)  # (B, N, width)
        raw = self.attention(x).transpose(1, 2)  # (B, M, N)
        if bags.mask is not None:
            raw = raw.masked_fill(~bags.mask[:, None], float("-inf"))
        attention = F.softmax(raw, dim=2)
        # one bag takes the 2-D product: bmm rounds a batch of one differently, and a one-bag step must give
        # CLAM's per-bag training exactly
        pooled = (attention[0] @ x[0])[None] if len(x) == 1 else attention @ x  # (B, M, width)
        if self.multi_branch:
            assert isinstance(self.classifiers, nn.ModuleList)  # so built for multi_branch
            logits = torch.cat([clf(pooled[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)  # (B, C)
            predicted = logits.argmax(dim=1)
            scores = attention.gather(1, predicted[:, None, None].expand(-1, 1, attention.shape[2]))[:, 0]
        else:
            logits = self.classifiers(pooled[:, 0])  # (B, C)
            scores = attention[:, 0]
        instance_loss = None
        if label is not None and self.instance_loss_fn is not None:
            labels = _bag_labels(label, len(x), self.n_classes)
            instance_loss = self._instance_loss(x, attention, labels, bags)
        if bags.single:
            return MILOutput(logits, attention[0], scores[0], None if instance_loss is None else instance_loss[0])
        return MILOutput(logits, attention, scores, instance_loss)

    def _instance_loss(self, x: torch.Tensor, attention: torch.Tensor, labels: list[int], bags: _Bags
                       ) -> torch.Tensor:
        """(B,) per bag: the sum over the instance branches CLAM trains for a bag of its class (mean over classes
        when subtyping), each the mean loss of its pseudo-labelled instances. Bags that take as many instances
        (``k``) and train a branch the same way go through it together."""
        total = x.new_zeros(len(x), dtype=torch.float32)  # fp32 under autocast too, where x is bf16/fp16
        ks = [min(self.k_sample, n // 2) for n in bags.lengths]
        for c, classifier in enumerate(self.instance_classifiers):
            for in_class in (True, False) if self.subtyping else (True,):
                for k in sorted(set(ks) - {0}):
                    group = [b for b, label in enumerate(labels) if (label == c) == in_class and ks[b] == k]
                    if group:
                        index = host_to_device(group, x.device)
                        loss = self._branch_loss(classifier, x, attention[:, c if self.multi_branch else 0], bags.mask,
                                                 None if len(group) == len(x) else index, k, in_class)
                        total = total.index_add(0, index, loss.float())
        return total / self.n_classes if self.subtyping else total

    def _branch_loss(self, classifier: nn.Module, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None,
                     group: torch.Tensor | None, k: int, in_class: bool) -> torch.Tensor:
        """(G,) the mean loss of one instance classifier on the pseudo-labelled instances (:func:`pseudo_labels`
        of ``rows`` (B, N)) of the bags ``group`` (positions on ``x``'s device; None: all of them)."""
        if group is not None:
            x, rows, mask = x[group], rows[group], None if mask is None else mask[group]
        picked, targets = pseudo_labels(rows, k, in_class, mask)  # (G, 2k or k) each
        instances = x.gather(1, picked[..., None].expand(-1, -1, x.shape[2]))  # (G, 2k or k, width)
        assert self.instance_loss_fn is not None  # only called with an instance loss
        loss = self.instance_loss_fn(classifier(instances).flatten(0, 1), targets.flatten())
        return loss.view(len(x), -1).mean(dim=1)


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

    def forward(self, h: torch.Tensor, label: int | Sequence[int] | torch.Tensor | None = None,
                lengths: Sequence[int] | None = None) -> MILOutput:
        bags = _check_bags(h, self.in_dim, lengths)
        logits = self.classifier(self.fc(bags.h))  # (B, N, C)
        probs = logits.softmax(dim=2)
        # binary: the instance most likely positive; multi-class: the one holding the largest probability
        scores = probs[..., 1] if self.n_classes == 2 else probs.max(dim=2).values  # (B, N)
        ranked = scores if bags.mask is None else scores.masked_fill(~bags.mask, -1.0)
        top = ranked.argmax(dim=1)
        bag_logits = logits.gather(1, top[:, None, None].expand(-1, 1, self.n_classes))[:, 0]  # (B, C)
        return MILOutput(bag_logits, None, scores[0] if bags.single else scores, None)


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


def mil_loss(output: MILOutput, label: int | Sequence[int] | torch.Tensor, bag_weight: float = 0.7) -> torch.Tensor:
    """CLAM's total loss ``c1 * CE(bag logits, label) + (1 - c1) * instance loss``, plain CE without one; for a
    batch of bags (``label`` one per bag) the mean over the bags."""
    if not 0 <= bag_weight <= 1:
        raise ValueError(f"bag_weight must lie in [0, 1], got {bag_weight}")
    target = torch.as_tensor(label, device=output.logits.device).long().reshape(-1)
    bag = F.cross_entropy(output.logits, target)
    if output.instance_loss is None:
        return bag
    return bag_weight * bag + (1 - bag_weight) * output.instance_loss.mean()

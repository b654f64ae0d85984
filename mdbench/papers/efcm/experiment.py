"""EFCM experiment glue: bags and splits, MIL training, the cached teacher features, stage-1 distillation and the
stage-2 strategies (Reuse / Retrain / End-to-end CLAM) and the figures, so that ``notebooks/efcm.ipynb`` stays a
sequence of calls: :class:`Config`, :func:`load_data`, :func:`encode`, :func:`run`, :func:`record`,
:func:`plot_pareto`, :func:`plot_attention`, :func:`plot_curves`; Table 2's costs are in
:mod:`mdbench.papers.efcm.costs`, the bags held on the training device and served in batches in
:mod:`mdbench.papers.efcm.bags`, a run's GPU cost estimate in :mod:`mdbench.papers.efcm.budget`.

A **bag** is a tuple ``(instances, label, instance_labels)``: instances are patches (N, 3, h, w) in [0, 1] or
features (N, D); ``label`` an int; ``instance_labels`` an (N,) tensor or None where unknown. One protocol seed is
one repeat of a stratified k-fold cross-validation over all bags of a dataset (CLAM's protocol, shuffled by the
seed; no two bags share an instance); each fold trains everything on its training bags and predicts
its test bags, and the out-of-fold predictions of all bags give one accuracy and AUC per row and seed. Tables
report mean ± std over seeds; the records keep every bag's outputs.

Stages (Li & Diao, arXiv 2409.11817, as we read them: ``docs/papers/efcm.md``):

1. **Distil** the frozen teacher's (standardised) patch features into a student, without labels, on each fold's
   training patches: FPD (``L = MSE + (1 - cos)`` after a projection head) or plain feature KD (MSE).
2. **Slide/bag level**: *Reuse* runs the CLAM trained on teacher features on the student's projected features;
   *Retrain* trains a new CLAM on frozen student features; *ETC* trains student and CLAM end to end with bag
   labels, starting from the stage-1 student and the Reuse CLAM, with a sub-sample of patches per step carrying
   gradients.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, cast, overload

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mdbench import figures, metrics, train
from mdbench import samples as sample_outputs
from mdbench.data.splits import kfold_splits
from mdbench.losses.projection import fpd_loss
from mdbench.models import build_model, freeze
from mdbench.models.clam import MILOutput, mil_loss
from mdbench.models.inputs import host_to_device, rgb_batch_at_size
from mdbench.models.transscan import TransScanStudent
from mdbench.papers.efcm.bags import BagBatch, BagSet, row_batches
from mdbench.params import NotebookConfig
from mdbench.repro import seed_rngs
from mdbench.work import Work, uncached

Bag = tuple[torch.Tensor, int, "torch.Tensor | None"]
_REPO_ROOT = Path(__file__).resolve().parents[3]
CACHE_ENV = "MDBENCH_CACHE_DIR"

__all__ = [
    "CURVES", "Bag", "BagData", "Config", "DatasetRun", "EndToEndMIL", "FeatureScaler", "FoldResult",
    "PatchEncoder", "SeedResult", "autocast", "cache_dir", "distill", "draw_pareto", "encode", "encode_bags",
    "fast_teacher",
    "fit_heads", "fold_index", "instance_auc", "load_bags", "load_data", "mosaic", "plot_attention", "plot_curves",
    "plot_pareto", "predict_bags", "record", "record_figures", "run", "run_split", "split_features", "steps_batch",
    "students",
    "teacher_features",
    "teacher_input", "teacher_model", "texture_teacher", "train_mil",
]


# ----------------------------------------------------------------------------------------------- bags, splits
def _fused(device: str | torch.device) -> bool | None:
    """Adam's fused CUDA kernel (one launch per step instead of several per parameter) on CUDA; the default
    elsewhere."""
    return True if torch.device(device).type == "cuda" else None


def _seeded(seed: int) -> torch.Generator:
    """Seed the global RNGs (dropout, sub-sampling) and return a generator for the loader; the deterministic
    mode the notebook chose is left as it is."""
    seed_rngs(seed)
    return torch.Generator().manual_seed(seed)


def fold_index(labels: Sequence[int] | np.ndarray, k: int, seed: int) -> list[dict[str, np.ndarray]]:
    """One repeat (``seed``) of stratified k-fold cross-validation over all bags, CLAM's protocol (10 folds).

    The ``"test"`` parts of the k folds partition the bags (:func:`mdbench.data.splits.kfold_splits`, shuffled by
    ``seed``). Each fold's other bags are cut by the same stratified k-fold into ``max(2, k - 1)`` parts: one is
    ``"val"`` (the epoch of lowest validation loss), the rest ``"train"``; 80/10/10 at k = 10 (CLAM's splits),
    60/20/20 at k = 5.

    Returns:
        one ``{"train", "val", "test"}`` dict of sorted positions into the bags per fold.
    """
    labels = np.asarray(labels)
    folds = []
    for rest, test in kfold_splits(labels, k, seed):
        train, val = kfold_splits(labels[rest], max(2, k - 1), seed)[0]
        folds.append({"train": rest[train], "val": rest[val], "test": test})
    return folds


@dataclass
class BagData:
    """One dataset's bags for the notebook.

    ``bags``: patch bags (``kind="patches"``) or feature bags (``kind="features"``, e.g. UCSB's published
    features: MIL heads only). ``ids``: a stable name per bag (an ISIC image id, a UCSB bag id, a cell set's
    number), the unit of the per-bag outputs behind the records. No two bags share an instance, so that a
    k-fold split of the bags keeps the test instances out of training. ``checksum`` names the data.
    """

    name: str
    bags: list[Bag]
    checksum: str
    ids: list[str]
    kind: str = "patches"

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.bags) or len(set(self.ids)) != len(self.ids):
            raise ValueError(f"{self.name}: {len(self.bags)} bags need as many distinct ids, got {len(self.ids)} "
                             f"({len(set(self.ids))} distinct)")

    @property
    def labels(self) -> np.ndarray:
        """(B,) bag labels."""
        return np.asarray([int(b[1]) for b in self.bags])


def load_bags(name: str, *, n_bags: int, bag_size: tuple[int, int] = (4, 8), patch_size: int = 32,
              isic_grid: int = 2, isic_stride: int | None = None, data_dir: str | None = None) -> BagData:
    """The bags of one dataset at the notebook's scale.

    - ``synthetic``: :class:`~mdbench.data.synthetic.SyntheticMILBags` of ``patch_size`` texture images.
    - ``isic2017``: ISIC 2017 images as bags of ``isic_grid``² tiles of ``patch_size`` pixels every
      ``isic_stride`` pixels (default ``patch_size``), from the image resized to the side they cover; positive =
      melanoma (:func:`mdbench.data.tasks.isic_image_bags`). A seeded subset of ``n_bags`` images, half of them
      melanoma (as many as there are); all images when ``n_bags`` is at least their number.
    - ``pbc``: PBC cell sets drawn from all images, no image in two sets, positive = holds an erythroblast
      (:func:`mdbench.data.tasks.pbc_cell_set_bags` with ``disjoint``): ``n_bags``, or as many as the images
      fill (the shared subset's 120 erythroblasts fill about 60 positive sets).
    - ``ucsb_breast``: the 58 UCSB bags of published 708-d features (``kind="features"``).
    """
    from mdbench.data.registry import load_dataset
    from mdbench.data.synthetic import SyntheticMILBags
    from mdbench.data.tasks import isic_image_bags, pbc_cell_set_bags
    from mdbench.data.ucsb_breast import UCSBBreastDataset

    if name == "synthetic":
        synthetic = SyntheticMILBags(n_bags, bag_size=(*bag_size,), instances="images", image_size=patch_size, seed=0)
        return BagData(name, [synthetic[i] for i in range(len(synthetic))], synthetic.checksum,
                       [f"bag{i:04d}" for i in range(len(synthetic))])
    if name == "isic2017":
        isic = isic_image_bags("all", grid=isic_grid, tile=patch_size, stride=isic_stride, data_dir=data_dir)
        rng = np.random.default_rng(0)
        positives, negatives = np.flatnonzero(isic.bag_labels == 1), np.flatnonzero(isic.bag_labels == 0)
        n_pos = min(n_bags // 2, len(positives))
        chosen = np.sort(np.r_[rng.choice(positives, n_pos, replace=False),
                               rng.choice(negatives, min(n_bags - n_pos, len(negatives)), replace=False)])
        checksum = hashlib.sha256(f"{isic.checksum}|{chosen.tolist()}".encode()).hexdigest()
        # the ISIC loader behind the bags names its images (ids) and keeps its cases' positions (indices)
        images = cast(Any, isic.segmentation)
        return BagData(name, [isic[int(i)] for i in chosen], checksum,
                       [str(images.ids[int(images.indices[i])]) for i in chosen])
    if name == "pbc":
        cells = pbc_cell_set_bags("all", n_bags=n_bags, bag_size=(*bag_size,), image_size=patch_size,
                                  data_dir=data_dir, disjoint=True)
        return BagData(name, [cells[i] for i in range(len(cells))], cells.checksum,
                       [f"cellset{i:04d}" for i in range(len(cells))])
    if name == "ucsb_breast":
        # the registry types its result as Dataset; ucsb_breast's loader is a UCSBBreastDataset
        ucsb = cast(UCSBBreastDataset, load_dataset("ucsb_breast", split="all", data_dir=data_dir))
        features: list[Bag] = []
        for i in range(len(ucsb)):  # indexed (its __getitem__), as iterating it would
            x, y = ucsb[i]
            features.append((x, y, None))
        return BagData(name, features, ucsb.checksum, [str(b) for b in ucsb.bag_ids], kind="features")
    raise ValueError(f"unknown EFCM dataset {name!r}; choose synthetic, isic2017, pbc or ucsb_breast")


def load_data(cfg: Config) -> dict[str, BagData]:
    """The bags of every dataset of ``cfg.datasets`` (:func:`load_bags` at the config's scale)."""
    return {name: load_bags(name, n_bags=cfg.n_bags, bag_size=cfg.bag_size, patch_size=cfg.patch_size,
                            isic_grid=cfg.isic_grid, isic_stride=cfg.isic_stride, data_dir=cfg.data_dir)
            for name in cfg.datasets}


# ------------------------------------------------------------------------------------------------ MIL training
def _mil_step(bag_weight: float) -> train.StepFn:
    def step(model: nn.Module, batch: BagBatch) -> tuple[torch.Tensor, dict]:
        out: MILOutput = model(batch.instances, batch.classes, batch.lengths)
        bag_ce = F.cross_entropy(out.logits, batch.labels)
        return mil_loss(out, batch.labels, bag_weight), {"bag_ce": bag_ce.detach()}
    return step


def _bag_set(bags: Sequence[Bag] | BagSet, device: str | torch.device) -> BagSet:
    """``bags`` as a :class:`BagSet` on ``device`` (moved there once, not per step)."""
    return BagSet(bags.instances.to(device), bags.starts, bags.lengths, bags.labels) if isinstance(bags, BagSet) \
        else BagSet.of(bags, device)


def train_mil(model: nn.Module, train_bags: Sequence[Bag] | BagSet, val_bags: Sequence[Bag] | BagSet | None, *,
              epochs: int, lr: float = 2e-4, weight_decay: float = 1e-5, bag_weight: float = 0.7, seed: int = 0,
              device: str = "cpu", optimizer: torch.optim.Optimizer | None = None, weighted_sample: bool = True,
              amp: bool = False, batch_size: int = 1) -> train.History:
    """Train a MIL model (``model(instances, labels, lengths) -> MILOutput``) on ``batch_size`` bags per step (one,
    as CLAM does, by default; more: the mean loss of a zero-padded batch of bags, each computed as alone).

    Adam (lr 2e-4, weight decay 1e-5: CLAM's README recipe) unless ``optimizer`` is given; class-balanced
    sampling (``--weighted_sample``); loss :func:`mdbench.models.clam.mil_loss` with ``bag_weight``. With
    ``val_bags`` the weights of the epoch with the lowest validation loss are restored at the end (CLAM keeps
    its best checkpoint by validation loss). The bags are moved to ``device`` once.
    """
    generator = _seeded(seed)
    loader = _bag_set(train_bags, device).loader(batch_size, weighted=weighted_sample, shuffle=True,
                                                 generator=generator)
    val_loader = _bag_set(val_bags, device).loader(batch_size) if val_bags else None
    optimizer = optimizer or torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                              weight_decay=weight_decay, fused=_fused(device))
    stopping = train.EarlyStopping("val_loss", patience=epochs, restore_best=True) if val_loader else None
    return train.fit(model, loader, val_loader, optimizer=optimizer, epochs=epochs, device=device,
                     step_fn=_mil_step(bag_weight), early_stopping=stopping, progress=False, amp=amp)


@torch.no_grad()
def predict_bags(model: nn.Module, bags: Sequence[Bag] | BagSet, device: str = "cpu", batch_size: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(bag probabilities (B, C), labels (B,), per-bag instance scores [(N_i,)]) in eval mode, ``batch_size``
    bags per call; the outputs come to the host once, at the end."""
    model.to(device).eval()
    data = _bag_set(bags, device)
    probs, scores = [], []
    for batch in data.batches(batch_size):
        out: MILOutput = model(batch.instances, lengths=batch.lengths)
        probs.append(out.logits.softmax(dim=1).float())
        scores += [row[:n] for row, n in zip(out.instance_scores.float(), batch.lengths, strict=True)]
    flat = torch.cat(scores).cpu().numpy()
    return torch.cat(probs).cpu().numpy(), data.labels.copy(), np.split(flat, np.cumsum(data.lengths)[:-1])


# ---------------------------------------------------------------------------------------------------- features
@torch.no_grad()
def encode_bags(encoder: nn.Module, bags: BagSet, batch_size: int = 1) -> BagSet:
    """The bags with their instances replaced by ``encoder(instances)`` (e.g. a frozen student, in eval mode),
    ``batch_size`` whole bags per call, as float32 on the bags' device."""
    groups = [bags.subset(range(i, min(i + batch_size, len(bags)))) for i in range(0, len(bags), batch_size)]
    out = [encoder(group.flat()).float() for group in groups]
    return BagSet(torch.cat(out), np.r_[0, np.cumsum(bags.lengths)[:-1]], bags.lengths, bags.labels)


def split_features(features: torch.Tensor, bags: Sequence[Bag]) -> list[Bag]:
    """Cut (sum N_i, D) features, stacked in bag order, back into feature bags with the bags' labels."""
    sizes = [len(b[0]) for b in bags]
    if sum(sizes) != len(features):
        raise ValueError(f"{len(features)} feature rows for bags holding {sum(sizes)} instances")
    return [(f, b[1], b[2] if len(b) > 2 else None) for f, b in zip(features.split(sizes), bags, strict=False)]


@dataclass
class FeatureScaler:
    """Per-dimension z-scoring fitted on training features; applied to teacher features before any use, so the
    distillation targets and the teacher's CLAM live in the same standardised space."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, bags: Sequence[Bag] | BagSet) -> FeatureScaler:
        """Mean and std per dimension of the bags' (N_i, D) features."""
        feats = bags.flat() if isinstance(bags, BagSet) else torch.cat([b[0] for b in bags])
        return cls(feats.mean(dim=0), feats.std(dim=0).clamp_min(1e-6))

    @overload
    def __call__(self, bags: BagSet) -> BagSet: ...

    @overload
    def __call__(self, bags: Sequence[Bag]) -> list[Bag]: ...

    def __call__(self, bags: Sequence[Bag] | BagSet) -> list[Bag] | BagSet:
        if isinstance(bags, BagSet):
            return bags.with_instances((bags.instances - self.mean) / self.std)
        return [((b[0] - self.mean) / self.std, b[1], b[2] if len(b) > 2 else None) for b in bags]


def cache_dir() -> Path:
    """Where teacher features are cached: ``$MDBENCH_CACHE_DIR/efcm`` or ``<repo>/.cache/efcm`` (git-ignored)."""
    return Path(os.environ.get(CACHE_ENV, _REPO_ROOT / ".cache")) / "efcm"


def _fingerprint(teacher: PatchEncoder, patches: torch.Tensor, amp: bool, compiled: bool) -> str:
    digest = hashlib.sha256()
    identity = f"{type(teacher.encoder).__name__}|{teacher.mdbench_init}|{teacher.input_size}|amp={amp}"
    identity += "|compiled" if compiled else ""  # compiled kernels round otherwise; eager keys stay as they were
    digest.update(identity.encode())
    digest.update(str(tuple(patches.shape)).encode())
    digest.update(patches.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def autocast(device: torch.device, amp: bool):
    """The autocast the teacher's features are computed under: bf16 on CPU, bf16 (or fp16 without bf16) on CUDA
    where ``amp``, else none."""
    if not amp:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class PatchEncoder(nn.Module):
    """A teacher as a patch-feature extractor: (B, 3, h, w) -> (B, D), resizing to its input size first.

    ``encoder`` has ``pooled(x) -> (B, D)`` (e.g. :class:`mdbench.models.LiteMedSAMEncoder`, whose 256x256 input
    the small tiles are bilinearly upsampled to) or ``forward(x) -> (B, D)``; ``input_size`` (default
    ``encoder.input_size``, None = as given) is the side patches are resized to. FLOPs and latency measured on
    this module include the resizing, as every patch pays it.
    """

    def __init__(self, encoder: nn.Module, input_size: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.input_size = input_size or getattr(encoder, "input_size", None)
        self.mdbench_init = getattr(encoder, "mdbench_init", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(rgb_batch_at_size(x, self.input_size, "the patch encoder"))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) inputs already at the encoder's size -> (B, D)."""
        return getattr(self.encoder, "pooled", self.encoder)(x)


class _CompiledEncoder(nn.Module):
    """A :class:`PatchEncoder` whose encoder runs ``torch.compile``d; the resize stays outside the compiled graph,
    which therefore sees inputs of the encoder's size only, from :func:`teacher_features` and Table 2 alike."""

    def __init__(self, teacher: PatchEncoder) -> None:
        super().__init__()
        self.teacher = teacher
        self.encode = torch.compile(teacher.encode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(rgb_batch_at_size(x, self.teacher.input_size, "the patch encoder"))


_COMPILED: weakref.WeakKeyDictionary[PatchEncoder, _CompiledEncoder] = weakref.WeakKeyDictionary()


def fast_teacher(teacher: PatchEncoder, device: str | torch.device, compile: bool = False) -> nn.Module:
    """The teacher as :func:`teacher_features` and Table 2's throughput run it: on ``device`` in eval mode; on CUDA
    with channels-last weights (tensor cores take NHWC) and, with ``compile``, its encoder ``torch.compile``d
    once per teacher (the fastest configuration of ``benchmarks/teacher_throughput.py``; give it batches of one
    size, or it compiles again)."""
    device = torch.device(device)
    teacher.to(device).eval()
    if device.type != "cuda":
        return teacher
    _channels_last(teacher, device)
    if not compile:
        return teacher
    if teacher not in _COMPILED:
        _COMPILED[teacher] = _CompiledEncoder(teacher)
    return _COMPILED[teacher]


@torch.no_grad()
def teacher_features(teacher: PatchEncoder, patches: torch.Tensor, *, name: str, batch_size: int = 8,
                     amp: bool = True, device: str = "cpu", cache: bool = True, compile: bool = False,
                     progress: Callable | None = None) -> torch.Tensor:
    """Pooled teacher features of every patch, computed once and cached on disk.

    Args:
        teacher: the frozen teacher wrapped in :class:`PatchEncoder`.
        patches: (N, 3, h, w) float in [0, 1] on the CPU; they move to ``device`` at once and are encoded there
            ``batch_size`` at a time, the features coming back to the host once, at the end.
        name: a readable prefix of the cache file (dataset and tiling).
        amp: bf16 autocast on CPU, bf16/fp16 on CUDA (the cache key includes it).
        cache: read/write ``cache_dir()/<name>-<hash of teacher, amp, compile and patch bytes>.pt``.
        compile: on CUDA, run the teacher ``torch.compile``d (:func:`fast_teacher`), every batch padded to
            ``batch_size`` so that it compiles once.
        progress: optional wrapper of the batch iterator (e.g. ``tqdm``).

    Returns:
        (N, D) float32 features on the CPU.
    """
    if patches.ndim != 4 or patches.shape[1] != 3:
        raise ValueError(f"patches must be (N, 3, h, w), got {tuple(patches.shape)}")
    dev = torch.device(device)
    compile = compile and dev.type == "cuda"
    path = cache_dir() / f"{name}-{_fingerprint(teacher, patches, amp, compile)}.pt"
    if cache and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    model = fast_teacher(teacher, dev, compile)
    # bags may share patches (PBC cell sets drawn with replacement): encode each distinct patch once
    unique, inverse = torch.unique(patches.to(dev).flatten(1), dim=0, return_inverse=True)
    batches = unique.view(-1, *patches.shape[1:]).split(batch_size)
    out = []
    for chunk in progress(batches) if progress else batches:
        n = len(chunk)
        if compile and n < batch_size:  # one shape for the compiled teacher: no recompilation for the last batch
            chunk = torch.cat([chunk, chunk.new_zeros(batch_size - n, *chunk.shape[1:])])
        with autocast(dev, amp):
            out.append(model(chunk)[:n].float())
    features = torch.cat(out)[inverse].cpu()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        train.save_atomic(features, path)
    return features


# ------------------------------------------------------------------------------------------------------ stage 1
def _channels_last(model: nn.Module, device: str | torch.device) -> None:
    """On CUDA, ``model``'s convolution weights in channels-last (NHWC) layout, which tensor cores run fastest;
    the CPU keeps the default layout (and with it the numbers of the committed cpu results)."""
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)


def distill(student: TransScanStudent, patches: torch.Tensor, targets: torch.Tensor, *, loss: str = "fpd",
            epochs: int, lr: float = 1e-3, batch_size: int = 64, seed: int = 0, device: str = "cpu",
            amp: bool = False) -> train.History:
    """Stage 1: train ``student(patches)`` to match the teacher's ``targets`` (N, D), no labels involved.

    ``loss="fpd"``: MSE + (1 - cos) (:func:`mdbench.losses.projection.fpd_loss`); ``"mse"``: plain feature KD.
    AdamW with cosine decay to zero over the run. Patches and targets move to ``device`` once and each batch is
    one indexing there (:func:`~mdbench.papers.efcm.bags.row_batches`); on CUDA the student runs channels-last.
    """
    if loss not in ("fpd", "mse"):
        raise ValueError(f"distillation loss must be 'fpd' or 'mse', got {loss!r}")
    if len(patches) != len(targets):
        raise ValueError(f"{len(patches)} patches but {len(targets)} teacher features")
    generator = _seeded(seed)
    loader = row_batches(patches.to(device), targets.to(device), batch_size=batch_size, generator=generator,
                         drop_last=len(patches) > batch_size)  # BatchNorm needs batches of more than one
    _channels_last(student, device)
    loss_fn = (lambda p, t: fpd_loss(p, t)) if loss == "fpd" else F.mse_loss
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05, fused=_fused(device))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    return train.fit(student, loader, None, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                     scheduler_interval="step", epochs=epochs, device=device, progress=False, amp=amp)


# ------------------------------------------------------------------------------------------------------ stage 2
class EndToEndMIL(nn.Module):
    """ETC: a patch encoder and a MIL head trained together on bags of patches.

    ``forward(patches, label=None, lengths=None) -> MILOutput`` on one bag (N, 3, h, w) or on B bags
    (B, N, 3, h, w) zero-padded to N with their ``lengths`` (host ints): the encoder runs once over the real
    patches of all B bags. In training mode at most ``max_patches`` randomly chosen patches per bag carry
    gradients; the others are encoded under ``no_grad`` (the memory bound of the spec), and the head sees every
    bag's patches in their order. With ``freeze_bn`` the encoder's BatchNorm layers keep their stage-1 statistics
    (bags are small, correlated batches), so that which bags share a batch changes nothing.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, max_patches: int | None = None,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        self.encoder, self.head, self.max_patches, self.freeze_bn = encoder, head, max_patches, freeze_bn

    def train(self, mode: bool = True) -> EndToEndMIL:
        super().train(mode)
        if self.freeze_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, patches: torch.Tensor, label: int | Sequence[int] | torch.Tensor | None = None,
                lengths: Sequence[int] | None = None) -> MILOutput:
        single = patches.ndim == 4
        bags = patches[None] if single else patches  # (B, N, 3, h, w)
        b, n = bags.shape[:2]
        sizes = [n] * b if lengths is None else [int(x) for x in lengths]
        flat = bags.flatten(0, 1)  # (B * N, 3, h, w); bag i's patches at i * N + j
        real = None if min(sizes) == n else host_to_device(
            [i * n + j for i, m in enumerate(sizes) for j in range(m)], flat.device)
        if not self.training or not self.max_patches or max(sizes) <= self.max_patches:
            features = self.encoder(flat if real is None else flat[real])
        else:
            # per bag: a random order (drawn on the host: a small randperm on CUDA would wait for the GPU), whose
            # first max_patches carry gradients (a bag that small: all, in order)
            orders = [torch.randperm(m) if m > self.max_patches else torch.arange(m) for m in sizes]
            keep = [min(m, self.max_patches) for m in sizes]
            with_grad = torch.cat([o[:k] + i * n for i, (o, k) in enumerate(zip(orders, keep, strict=True))])
            rest = torch.cat([o[k:] + i * n for i, (o, k) in enumerate(zip(orders, keep, strict=True))])
            # back in flat order: position p of the real patches holds the feature of the p-th smallest index
            order = torch.cat([with_grad, rest]).argsort()
            with_grad, rest, order = (host_to_device(t, flat.device) for t in (with_grad, rest, order))
            with torch.no_grad():
                frozen = self.encoder(flat[rest])
            features = torch.cat([self.encoder(flat[with_grad]), frozen])[order]
        if real is not None:  # zero-padded again to (B * N, D)
            features = features.new_zeros(b * n, features.shape[1]).index_copy(0, real, features)
        features = features.view(b, n, -1)
        return self.head(features[0], label) if single else self.head(features, label, sizes)


@dataclass(frozen=True)
class Config(NotebookConfig):
    """The notebook's parameters: the data, the teacher, both stages, the MIL heads and Table 2's measurement."""

    selectors: ClassVar[tuple[str, ...]] = ("seeds", "datasets")  # each fold's unit of work names both
    later_fields: ClassVar[tuple[str, ...]] = ("min_steps_per_epoch",)

    datasets: tuple[str, ...] = ("isic2017", "pbc", "ucsb_breast")
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)   # one repeat of the k-fold cross-validation per seed
    folds: int = 10                      # k of the stratified k-fold over all bags (CLAM: 10)
    teacher: str = "litemedsam"          # litemedsam | texture (the smoke stand-in, trained in the notebook)
    patch_size: int = 32
    n_bags: int = 40
    bag_size: tuple[int, int] = (4, 8)
    isic_grid: int = 2
    isic_stride: int | None = None       # pixels between ISIC tiles; None: patch_size (non-overlapping)
    head_hidden: tuple[int, int] = (512, 256)
    k_sample: int = 8
    dropout: float = 0.25
    bag_weight: float = 0.7
    head_epochs: int = 20
    head_lr: float = 2e-4
    student_backbone: str = "resnet10t"
    student_out_index: int = 2
    distill_epochs: int = 20
    distill_lr: float = 1e-3
    distill_batch: int = 64
    etc_epochs: int = 5
    etc_lr_student: float = 1e-4
    etc_max_patches: int = 16
    heads: tuple[str, ...] = ("clam_sb", "clam_mb", "abmil", "mil")
    bag_batch: int = 1                   # bags per step of MIL training, prediction and encoding (CLAM: 1)
    min_steps_per_epoch: int = 0         # training batches shrink where a dataset would give fewer steps (0: off)
    device: str = "cpu"
    amp: bool = False
    teacher_batch: int = 8
    teacher_compile: bool = False        # torch.compile the teacher on CUDA
    cost_bag_size: int = 1000            # patches per bag for Table 2's cost per bag
    latency_repeats: int = 20


@dataclass
class FoldResult:
    """One fold's outputs on its test bags: ``test_index`` (n,) positions into the dataset's bags;
    ``probs[table][row]`` (n, C) class probabilities (``table1``: Table 1's rows, ``mil_heads``: the MIL heads on
    the frozen features); ``instance_scores[row]`` the (N_i,) attention of each test bag, for the rows kept for
    heatmaps; ``distill_loss[variant]`` stage 1's last-epoch loss; ``curves[run]`` the per-epoch loss of each
    training run of :data:`CURVES`."""

    test_index: np.ndarray
    probs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    instance_scores: dict[str, list[np.ndarray]] = field(default_factory=dict)
    distill_loss: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class SeedResult:
    """One repeat (seed) of the k-fold cross-validation: every bag's out-of-fold outputs, each from the one fold
    that tested it, pooled into one AUC and accuracy per row (:meth:`scores`).

    ``labels`` (B,) and ``fold`` (B,) the fold that tested each bag; ``probs[table][row]`` (B, C);
    ``instance_scores[row]`` one (N_i,) array per bag; ``distill_loss[variant]`` one value per fold;
    ``curves[run]`` one per-epoch loss curve per fold.
    """

    labels: np.ndarray
    fold: np.ndarray
    probs: dict[str, dict[str, np.ndarray]]
    instance_scores: dict[str, list[np.ndarray]]
    distill_loss: dict[str, list[float]]
    curves: dict[str, list[list[float]]] = field(default_factory=dict)

    @classmethod
    def pool(cls, folds: Sequence[FoldResult], labels: Sequence[int] | np.ndarray) -> SeedResult:
        """The folds' test outputs in bag order; refuses folds whose test bags do not partition the bags."""
        tested = np.concatenate([f.test_index for f in folds])
        if not np.array_equal(np.sort(tested), np.arange(len(labels))):
            raise ValueError(f"the folds' test bags do not partition the {len(labels)} bags")
        order = np.argsort(tested)  # bag b's outputs sit at order[b] of the folds' concatenation
        fold = np.repeat(np.arange(len(folds)), [len(f.test_index) for f in folds])[order]
        probs = {table: {row: np.concatenate([f.probs[table][row] for f in folds])[order] for row in rows}
                 for table, rows in folds[0].probs.items()}
        scores = {row: [s for f in folds for s in f.instance_scores[row]] for row in folds[0].instance_scores}
        return cls(np.asarray(labels), fold, probs, {row: [s[i] for i in order] for row, s in scores.items()},
                   {v: [f.distill_loss[v] for f in folds] for v in folds[0].distill_loss},
                   {run: [f.curves[run] for f in folds] for run in folds[0].curves})

    def scores(self, table: str, row: str) -> dict[str, float]:
        """Accuracy and AUC (%) of ``row``'s out-of-fold outputs over all bags (macro one-vs-rest AUC for more
        than two classes)."""
        m = metrics.classification_metrics(self.labels, self.probs[table][row])
        return {"accuracy": 100 * m["accuracy"], "auc": 100 * m["auc"]}


# head name in the tables (Config.heads) -> registered MIL head; the tables call max-instance MIL "mil"
HEAD_MODELS = {"clam_sb": "clam_sb", "clam_mb": "clam_mb", "abmil": "abmil", "mil": "max_mil"}


def _head(cfg: Config, name: str, in_dim: int, n_classes: int) -> nn.Module:
    return build_model(HEAD_MODELS[name], in_dim=in_dim, n_classes=n_classes, hidden=cfg.head_hidden,
                       dropout=cfg.dropout, k_sample=cfg.k_sample, subtyping=n_classes > 2)


def _student(cfg: Config, variant: str, teacher_dim: int) -> TransScanStudent:
    """A stage-1 student from random init, as EFCM trains it."""
    # build_model returns nn.Module: the registry's "transscan_student" builds a TransScanStudent
    return cast(TransScanStudent, build_model("transscan_student", variant=variant, teacher_dim=teacher_dim,
                                              pretrained=False, backbone=cfg.student_backbone,
                                              out_index=cfg.student_out_index))


def steps_batch(batch: int, n: int, min_steps: int) -> int:
    """The batch size for ``n`` training items: ``batch``, or where that gives fewer than ``min_steps`` optimiser
    steps an epoch, ``n // min_steps`` (at least 1). Sized for ISIC's 900 training bags a fold, 128 bags a step left
    PBC's 49 one step an epoch (30 in a run), and every PBC row at chance."""
    if min_steps <= 0 or math.ceil(n / batch) >= min_steps:
        return batch
    return max(1, n // min_steps)


def _fit_head(cfg: Config, name: str, train_bags: BagSet, val_bags: BagSet, n_classes: int, seed: int
              ) -> tuple[nn.Module, list[float]]:
    """A fresh head trained on feature bags: (the head at its best epoch, the validation loss per epoch)."""
    seed_rngs(seed)  # fixes the head's initial weights
    head = _head(cfg, name, train_bags.instances.shape[1], n_classes)
    history = train_mil(head, train_bags, val_bags, epochs=cfg.head_epochs, lr=cfg.head_lr,
                        bag_weight=cfg.bag_weight, seed=seed, device=cfg.device,
                        batch_size=steps_batch(cfg.bag_batch, len(train_bags), cfg.min_steps_per_epoch))
    return head, [e["val_loss"] for e in history.epochs]


def fit_heads(parts: Mapping[str, Sequence[Bag] | BagSet], cfg: Config, n_classes: int, seed: int
              ) -> tuple[dict[str, nn.Module], dict[str, np.ndarray], dict[str, list[float]]]:
    """Train every head of ``cfg.heads`` on ``parts["train"]`` (best epoch by ``parts["val"]`` loss) and run it
    on ``parts["test"]``: (trained heads, ``{head: (n_test, C) class probabilities}``, ``{head: validation loss
    per epoch}``)."""
    sets = {name: _bag_set(part, cfg.device) for name, part in parts.items()}
    fitted = {name: _fit_head(cfg, name, sets["train"], sets["val"], n_classes, seed) for name in cfg.heads}
    probs = {name: predict_bags(head, sets["test"], cfg.device, cfg.bag_batch)[0] for name, (head, _) in fitted.items()}
    return {name: head for name, (head, _) in fitted.items()}, probs, {name: c for name, (_, c) in fitted.items()}


def _fit_etc(cfg: Config, student: nn.Module, head: nn.Module, parts: Mapping[str, BagSet], seed: int
             ) -> tuple[EndToEndMIL, list[float]]:
    """ETC from ``student`` and ``head``: (the model at its best epoch, the validation loss per epoch)."""
    model = EndToEndMIL(student, head, cfg.etc_max_patches)
    _channels_last(model, cfg.device)
    optimizer = torch.optim.Adam([{"params": student.parameters(), "lr": cfg.etc_lr_student},
                                  {"params": head.parameters(), "lr": cfg.head_lr}], weight_decay=1e-5,
                                 fused=_fused(cfg.device))
    history = train_mil(model, parts["train"], parts["val"], epochs=cfg.etc_epochs, optimizer=optimizer,
                        bag_weight=cfg.bag_weight, seed=seed, device=cfg.device, amp=cfg.amp,
                        batch_size=steps_batch(cfg.bag_batch, len(parts["train"]), cfg.min_steps_per_epoch))
    return model, [e["val_loss"] for e in history.epochs]


# the training runs of a fold whose per-epoch loss FoldResult.curves keeps, by kind: stage 1's training loss per
# student, the validation loss of each Table 1 head (the MIL-head table's CLAM-SB is teacher_clam)
CURVES = {"stage 1, training loss": ("distill_kd", "distill_fpd", "distill_fpd_ts"),
          "CLAM on frozen features, validation loss": ("teacher_clam", "kd_retrain", "fpd_retrain", "fpd_ts_retrain"),
          "end to end (ETC), validation loss": ("fpd_etc", "fpd_ts_etc", "no_distill_etc")}


def run_split(bags: Sequence[Bag] | BagSet, feature_bags: Sequence[Bag] | BagSet,
              index: Mapping[str, Sequence[int] | np.ndarray], cfg: Config, seed: int, n_classes: int = 2,
              keep_scores: Sequence[str] = ("teacher_clam", "fpd_ts_etc")) -> FoldResult:
    """The whole EFCM protocol on one fold of patch bags: everything is trained on the fold's training bags.

    Args:
        bags: patch bags ``(patches (N, 3, h, w), label, instance_labels)``, or all of them as a
            :class:`~mdbench.papers.efcm.bags.BagSet` already on ``cfg.device`` (:func:`run` builds it once).
        feature_bags: the same bags with the teacher's (N, D) features as instances (:func:`split_features` of
            :func:`teacher_features`), or their BagSet.
        index: ``{"train", "val", "test"}`` positions into ``bags`` (one fold of :func:`fold_index`).
        cfg: hyper-parameters; ``seed``: seeds initialisation, sampling and dropout of every model trained here.
        n_classes: bag classes (more than 2 turns on CLAM's subtyping).
        keep_scores: rows whose test-bag instance scores (attention) are kept for heatmaps.

    Rows (``probs["table1"]``): ``teacher_clam`` (CLAM-SB on teacher features: the large-model baseline),
    ``no_distill_etc`` (the EFCM student from random init trained end to end, no teacher), ``kd_retrain``, and
    ``{fpd, fpd_ts}_{reuse, retrain, etc}``; ``probs["mil_heads"]``: CLAM-SB, CLAM-MB, ABMIL, max-MIL on the
    teacher features. ``curves``: the per-epoch loss of every run of :data:`CURVES`.

    Stage 1 (distillation) is redone in every fold on that fold's training patches. It uses no labels, but
    distilling on all tiles would let the student see the test bags' patches (and their teacher features)
    before the fold tests it, which EFCM's deployment never does: per-fold distillation is the leak-free choice,
    and it costs k distillations per seed. MIL training, prediction and the students' features take
    ``cfg.bag_batch`` bags at a time.
    """
    patches, features = _bag_set(bags, cfg.device), _bag_set(feature_bags, cfg.device)
    if not np.array_equal(patches.lengths, features.lengths):
        raise ValueError(f"{len(patches)} patch bags and {len(features)} feature bags do not hold the same instances")
    result = FoldResult(np.asarray(index["test"]), {"table1": {}})
    splits = ("train", "val", "test")
    parts = {name: patches.subset(index[name]) for name in splits}
    standardised = FeatureScaler.fit(features.subset(index["train"]))(features)
    teacher = {name: standardised.subset(index[name]) for name in splits}
    dim = features.instances.shape[1]

    def score(row: str, model: nn.Module, test_bags: BagSet) -> None:
        result.probs["table1"][row], _, inst = predict_bags(model, test_bags, cfg.device, cfg.bag_batch)
        if row in keep_scores:
            result.instance_scores[row] = inst

    # MIL heads on the frozen teacher features; CLAM-SB is the large-model baseline and the Reuse head
    heads, result.probs["mil_heads"], head_curves = fit_heads(teacher, cfg, n_classes, seed)
    result.curves["teacher_clam"] = head_curves["clam_sb"]
    score("teacher_clam", heads["clam_sb"], teacher["test"])

    # stage 1 on the training bags' patches, targets = standardised teacher features
    train_patches, targets = parts["train"].flat(), teacher["train"].flat()
    for variant in ("kd", "fpd", "fpd_ts"):
        seed_rngs(seed)
        student = _student(cfg, variant, dim)
        history = distill(student, train_patches, targets, loss="mse" if variant == "kd" else "fpd",
                          epochs=cfg.distill_epochs, lr=cfg.distill_lr, seed=seed,
                          batch_size=steps_batch(cfg.distill_batch, len(train_patches), cfg.min_steps_per_epoch),
                          device=cfg.device, amp=cfg.amp)
        result.curves[f"distill_{variant}"] = [e["train_loss"] for e in history.epochs]
        result.distill_loss[variant] = history.epochs[-1]["train_loss"]
        encoded = encode_bags(student.eval(), patches, cfg.bag_batch)
        retrained, result.curves[f"{variant}_retrain"] = _fit_head(
            cfg, "clam_sb", encoded.subset(index["train"]), encoded.subset(index["val"]), n_classes, seed)
        score(f"{variant}_retrain", retrained, encoded.subset(index["test"]))
        if variant == "kd":
            continue
        score(f"{variant}_reuse", heads["clam_sb"], encoded.subset(index["test"]))
        etc, result.curves[f"{variant}_etc"] = _fit_etc(cfg, student, copy.deepcopy(heads["clam_sb"]), parts, seed)
        score(f"{variant}_etc", etc, parts["test"])

    # the same student and a fresh CLAM-SB trained end to end from random init: what bag labels alone give
    seed_rngs(seed)
    scratch = _student(cfg, "fpd_ts", dim)
    etc, result.curves["no_distill_etc"] = _fit_etc(cfg, scratch, _head(cfg, "clam_sb", dim, n_classes), parts, seed)
    score("no_distill_etc", etc, parts["test"])
    return result


def students(cfg: Config, teacher_dim: int) -> dict[str, TransScanStudent]:
    """One stage-1 student of each variant (``fpd_ts``, ``fpd``, ``kd``) from random init, projecting to
    ``teacher_dim``."""
    return {variant: _student(cfg, variant, teacher_dim) for variant in ("fpd_ts", "fpd", "kd")}


@dataclass
class DatasetRun:
    """Every seed of one dataset: one :class:`SeedResult` per seed, each a repeat of the ``folds``-fold
    cross-validation over all its bags (Table 1 rows for patch bags; MIL heads only for feature bags)."""

    name: str
    folds: int
    seeds: list[SeedResult]


def _feature_fold(bags: BagSet, index: Mapping[str, np.ndarray], cfg: Config, seed: int) -> FoldResult:
    """The MIL heads of one fold of feature bags, on features z-scored with the fold's training bags."""
    standardised = FeatureScaler.fit(bags.subset(index["train"]))(bags)
    _, probs, _ = fit_heads({name: standardised.subset(index[name]) for name in ("train", "val", "test")}, cfg, 2,
                            seed)
    return FoldResult(np.asarray(index["test"]), {"mil_heads": probs})


def run(data: BagData, feature_bags: Sequence[Bag] | None, cfg: Config, progress: Callable | None = None,
        work: Work = uncached) -> DatasetRun:
    """The EFCM protocol on one dataset: per seed, a stratified ``cfg.folds``-fold cross-validation over all its
    bags (:func:`fold_index`), :func:`run_split` on every fold, the folds' test outputs pooled. Feature bags
    (``data.kind == "features"``, ``feature_bags`` None) train the MIL heads only. The bags (and the teacher's
    features) move to ``cfg.device`` once, for all folds and seeds. ``progress`` optionally wraps the iterator
    over (seed, fold) pairs (e.g. ``tqdm``); each pair is a unit of ``work`` (dataset, seed, fold)."""
    folds = {seed: fold_index(data.labels, cfg.folds, seed) for seed in cfg.seeds}
    steps = [(seed, k) for seed in cfg.seeds for k in range(cfg.folds)]
    results: dict[int, list[FoldResult]] = {seed: [] for seed in cfg.seeds}
    bags = BagSet.of(data.bags, cfg.device)
    if data.kind != "features":
        assert feature_bags is not None  # patch bags always come with their teacher features
        features = BagSet.of(feature_bags, cfg.device)
    for seed, k in progress(steps) if progress else steps:
        if data.kind == "features":
            compute = partial(_feature_fold, bags, folds[seed][k], cfg, seed)
        else:
            compute = partial(run_split, bags, features, folds[seed][k], cfg, seed)
        results[seed].append(work("fold", compute, dataset=data.name, seed=seed, fold=k))
    return DatasetRun(data.name, cfg.folds, [SeedResult.pool(results[seed], data.labels) for seed in cfg.seeds])


def record(data: BagData, result: DatasetRun, cfg: Config) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per table (``table1``, ``mil_heads``) of one dataset's run: the long frame of its records (one line per
    row, metric and seed: accuracy and AUC in percent of the out-of-fold outputs of all bags) and the per-bag
    classifier outputs they are computed from (unit = the bag's id), for
    ``Session.record_frame(table, frame, samples=...)``."""
    n_bags = len(data.bags)
    common = {"dataset": data.name, "dataset_checksum": data.checksum, "config": cfg.as_record(), "unit": "%",
              "notes": f"stratified {result.folds}-fold cross-validation over all {n_bags} bags; out-of-fold "
                       "outputs of the folds pooled per seed"}
    out = {}
    for table in result.seeds[0].probs:
        values, samples = [], []
        for seed, pooled in zip(cfg.seeds, result.seeds, strict=True):
            for row, probs in pooled.probs[table].items():
                samples.append(sample_outputs.classifier_frame(seed, data.ids, pooled.labels, probs).assign(row=row))
                values += [{"row": row, "metric": metric, "seed": seed, "value": value, **common}
                           for metric, value in pooled.scores(table, row).items()]
        out[table] = (pd.DataFrame(values), pd.concat(samples, ignore_index=True))
    return out


# ------------------------------------------------------------------------------------------ smoke-profile teacher
def texture_teacher(image_size: int, *, n_images: int = 512, epochs: int = 3, backbone: str = "resnet10t",
                    seed: int = 0, device: str = "cpu") -> PatchEncoder:
    """The smoke profile's stand-in for a foundation model: a timm CNN pretrained (with labels) to tell the four
    textures of :class:`mdbench.data.synthetic.SyntheticClassification` apart, on images drawn from a seed
    stream of their own. LiteMedSAM costs ~75 GFLOPs per patch, too much for a one-minute CPU run; the cpu and
    gpu profiles use it. Returns the frozen (B, 3, h, w) -> (B, 512) pooled-feature extractor.
    """
    from mdbench.data.synthetic import SyntheticClassification

    data = SyntheticClassification(n_images, num_classes=4, image_size=image_size, channels=3, seed=10_000 + seed)
    generator = _seeded(seed)
    # a timm model (build_model types it nn.Module); its own API (reset_classifier) is untyped: timm has no stubs
    model: Any = build_model(f"timm:{backbone}", pretrained=False, num_classes=4)
    model.mdbench_init = f"texture-pretrained (SyntheticClassification, {n_images} images, {epochs} epochs)"
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=generator)
    train.fit(model, loader, loss_fn=nn.CrossEntropyLoss(), lr=3e-3, epochs=epochs, device=device, progress=False)
    model.reset_classifier(0)  # forward now returns the pooled pre-logit features
    return freeze(PatchEncoder(model))


def teacher_input(data: BagData, cfg: Config) -> str:
    """What the teacher sees of ``data``'s instances: their side and, where it resizes them (LiteMedSAM takes
    256x256 only), the side it resizes them to and by what factor."""
    if data.kind == "features":
        return f"{data.bags[0][0].shape[1]}-d features (no teacher)"
    side = data.bags[0][0].shape[-1]
    if cfg.teacher != "litemedsam":
        return f"{side} px, as they are"
    from mdbench.models.litemedsam import LiteMedSAMEncoder

    size = LiteMedSAMEncoder.input_size
    return f"{side} px, resized to {size} px ({size / side:g}x)" if size != side else f"{side} px, as they are"


def teacher_model(cfg: Config) -> PatchEncoder:
    """The frozen teacher: LiteMedSAM's image encoder, or the smoke profile's texture-pretrained stand-in."""
    if cfg.teacher == "litemedsam":
        return freeze(PatchEncoder(build_model("litemedsam_encoder")))
    return texture_teacher(cfg.patch_size, n_images=256, epochs=2, device=cfg.device)


def encode(teacher: PatchEncoder, data: dict[str, BagData], cfg: Config, progress: Callable | None = None
           ) -> tuple[dict[str, list[Bag]], dict[str, float]]:
    """The teacher's feature bags of every patch dataset (:func:`teacher_features`; cached for LiteMedSAM) and
    the seconds each took. ``progress(iterable, name)`` optionally wraps the batch iterator."""
    features, seconds = {}, {}
    for name, d in data.items():
        if d.kind == "features":
            continue
        patches = torch.cat([b[0] for b in d.bags])
        start = time.perf_counter()
        feats = teacher_features(teacher, patches, name=f"{name}-{cfg.patch_size}px-{cfg.teacher}",
                                 batch_size=cfg.teacher_batch, amp=cfg.amp, device=cfg.device,
                                 cache=cfg.teacher == "litemedsam", compile=cfg.teacher_compile,
                                 progress=(lambda it, name=name: progress(it, name)) if progress else None)
        seconds[name] = time.perf_counter() - start
        features[name] = split_features(feats, d.bags)
    return features, seconds


# ---------------------------------------------------------------------------------------------------- figures
@figures.styled
def plot_curves(runs: dict[str, DatasetRun]):
    """Per patch dataset, the per-epoch loss of every training run of :data:`CURVES`, one panel per kind, mean over
    all folds and seeds (band: ± one std). Returns the figure."""
    import matplotlib.pyplot as plt

    names = figures.method_names("efcm")
    image_sets = [name for name, r in runs.items() if r.seeds[0].curves]
    fig, axes = plt.subplots(len(image_sets), len(CURVES), figsize=(4.5 * len(CURVES), 3.2 * len(image_sets)),
                             squeeze=False)
    for line, name in zip(axes, image_sets, strict=True):
        for ax, (kind, kept) in zip(line, CURVES.items(), strict=True):
            for run in kept:
                values = np.array([curve for seed in runs[name].seeds for curve in seed.curves[run]])  # (runs, epochs)
                epochs = np.arange(1, values.shape[1] + 1)
                mean, std = values.mean(axis=0), values.std(axis=0)
                ax.plot(epochs, mean, label=figures.human(names, run.removeprefix("distill_")))
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
            ax.set_title(f"{name}: {kind}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mosaic(instances: torch.Tensor, values: Sequence[float] | np.ndarray, cols: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """A bag of N patches laid out row-major on a grid, and per-instance values on the same grid.

    Args:
        instances: (N, 3, h, w) patches in [0, 1] (an ISIC bag of ``grid``² tiles re-forms its image with
            ``cols=grid``).
        values: N per-instance values (attention, instance labels).
        cols: grid columns; default ``ceil(sqrt(N))``.

    Returns:
        image (rows * h, cols * w, 3) in [0, 1] (empty cells white) and value grid (rows, cols) (empty cells NaN).
    """
    n, _, h, w = instances.shape
    values = np.asarray(values, dtype=float)
    if len(values) != n:
        raise ValueError(f"{len(values)} values for {n} instances")
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    image = np.ones((rows * h, cols * w, 3))
    grid = np.full((rows, cols), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        image[r * h:(r + 1) * h, c * w:(c + 1) * w] = instances[i].permute(1, 2, 0).clamp(0, 1).numpy()
        grid[r, c] = values[i]
    return image, grid


@figures.styled
def plot_pareto(runs: dict[str, DatasetRun], costs: dict[str, dict[str, float]], cfg: Config):
    """Each Table 1 row of each patch dataset: its out-of-fold bag AUC, mean over seeds (bars: ± std over seeds),
    against the GFLOPs the encoder it deploys (paper.yaml's ``pareto.deployed``) and its head need for one bag of
    ``cfg.cost_bag_size`` inputs of Table 2's size (:func:`draw_pareto`). Returns the figure."""
    lines = []
    for name, run in runs.items():
        for row in run.seeds[0].probs.get("table1", {}):
            aucs = [r.scores("table1", row)["auc"] for r in run.seeds]
            lines.append({"dataset": name, "row": row, "auc": np.mean(aucs),
                          "std": np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0,
                          "protocol": f"{len(run.seeds[0].labels)} bags, {run.folds}-fold"})
    # costs also holds the exported students' parity checks, which have no FLOPs
    return draw_pareto(pd.DataFrame(lines), {encoder: c["gflops_bag"] for encoder, c in costs.items()
                                             if "gflops_bag" in c}, cfg.cost_bag_size)


def record_figures(store) -> dict:
    """The figures that ``store``'s records alone make (``mdbench figures``, no retraining): ``pareto``
    (:func:`draw_pareto` on Table 1's bag AUC and Table 2's GFLOPs per bag); none without both tables."""
    records = store.records()
    auc = [r for r in records if r.table == "table1" and r.metric == "auc"]
    gflops = [r for r in records if r.table == "table2" and r.metric == "gflops_bag"]
    if not auc or not gflops:
        return {}
    frame = pd.DataFrame([{"dataset": r.dataset, "row": r.row, "auc": r.mean, "std": r.std,
                           "protocol": r.notes.split(";")[0]} for r in auc])
    return {"pareto": draw_pareto(frame, {r.row: r.mean for r in gflops}, gflops[0].config["bag_size"])}


@figures.styled
def draw_pareto(scores: pd.DataFrame, gflops: dict[str, float], bag_size: int):
    """One panel per dataset of ``scores`` (columns dataset, row, auc, std, protocol: one line per Table 1 row): each
    row's bag AUC (± std over seeds) against ``gflops[encoder]``, the GFLOPs per bag of ``bag_size`` inputs of the
    encoder the row deploys; rows by human name, labels kept apart, log axis only over a decade. Returns the
    figure."""
    import matplotlib.pyplot as plt

    from mdbench import pareto

    spec = pareto.load_spec("efcm")
    assert spec is not None  # efcm's paper.yaml has a pareto section (tests/test_pareto.py)
    names = figures.method_names("efcm")
    datasets = list(dict.fromkeys(scores.dataset))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        mine = scores[(scores.dataset == name) & scores.row.isin(spec.deployed)]
        cost = mine.row.map(lambda row: gflops[spec.deployed[row]])
        teacher = mine.row == "teacher_clam"
        for kept, colour, label in ((teacher, "C3", "teacher"), (~teacher, "C0", "student")):
            ax.errorbar(cost[kept], mine.auc[kept], yerr=mine["std"][kept], fmt="o", color=colour, capsize=3,
                        label=label)
        figures.set_scale(ax, "x", cost)
        ax.set_xlabel(f"GFLOPs per bag of {bag_size} inputs (Table 2)")
        ax.set_ylabel("bag AUC (%), out of fold")
        ax.set_title(f"{name}: {mine.protocol.iloc[0]}")
        ax.legend(loc="lower right")
        figures.label_points(ax, list(cost), list(mine.auc), [figures.human(names, row) for row in mine.row])
    fig.tight_layout()
    return fig


def instance_auc(result: SeedResult, row: str, bags: Sequence[Bag]) -> float:
    """AUC (%) of ``row``'s out-of-fold attention against the key instances over all positive bags of one seed
    (NaN when those bags hold only key or only other instances)."""
    from sklearn.metrics import roc_auc_score

    # the bags here are patch bags, which carry their key-instance labels (never None)
    pairs = [(s, cast(torch.Tensor, bag[2]).numpy()) for s, bag in zip(result.instance_scores[row], bags, strict=True)
             if bag[1] == 1]
    labels = np.concatenate([p[1] for p in pairs])
    return 100 * roc_auc_score(labels, np.concatenate([p[0] for p in pairs])) if 0 < labels.mean() < 1 else np.nan


@figures.styled
def plot_attention(result: SeedResult, data: BagData, cfg: Config, rows: Sequence[str] = ("teacher_clam", "fpd_ts_etc"),
                   n_bags: int = 3):
    """The first ``n_bags`` bags of one seed (positive ones first), each with the attention of the fold that
    tested it: the bag as a grid (an ISIC image re-forms from its tiles), its key instances (grey: no instance)
    and each row's attention, titled with the row's :func:`instance_auc`. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = figures.method_names("efcm")
    bags = data.bags
    order = sorted(range(len(bags)), key=lambda i: -bags[i][1])[:n_bags]
    cols = cfg.isic_grid if data.name == "isic2017" else None
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("lightgrey")  # grid cells without an instance
    fig, axes = plt.subplots(len(order), 2 + len(rows), figsize=(10, 2.6 * len(order)), squeeze=False)
    for line, i in zip(axes, order, strict=False):
        instances, label, key = bags[i]
        assert key is not None  # patch bags carry their key-instance labels
        picture, truth = mosaic(instances, key.numpy(), cols)
        line[0].imshow(picture)
        line[0].set_title(f"{data.ids[i]} (label {label}, fold {result.fold[i]})", fontsize=8)
        line[1].imshow(truth, cmap=cmap, vmin=0, vmax=1)
        line[1].set_title("key instances", fontsize=8)
        line[1].legend(handles=[Patch(color=cmap(1.0), label="key"), Patch(color=cmap(0.0), label="other"),
                                Patch(color="lightgrey", label="no instance")], fontsize=6, loc="upper center",
                       bbox_to_anchor=(0.5, -0.02), ncol=3, frameon=False)
        for ax, row in zip(line[2:], rows, strict=False):
            shown = ax.imshow(mosaic(instances, result.instance_scores[row][i], cols)[1], cmap=cmap)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="attention")
            ax.set_title(f"{figures.human(names, row)}\n(inst. AUC {instance_auc(result, row, bags):.0f})", fontsize=8)
        for ax in line:
            ax.axis("off")
    fig.tight_layout()
    return fig

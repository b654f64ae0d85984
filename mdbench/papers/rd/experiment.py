"""Experiment glue of the Reprogramming Distillation notebook: data as tensors, cached FM features, method runners.

- :func:`load_classification`: a dataset's train and test splits as in-memory tensors at one resolution.
- :func:`label_subset` / :func:`make_task`: the label fraction (full or low-data) of one seed, with the frozen FM's
  features of the *un-reprogrammed* images computed once per dataset (:func:`cache_features`). Only the FM
  fine-tuning baselines, and RD and RD without CKA when their reprogrammer acts on the FM's input
  (``Config.phi_space = "image"``), run the FM at every step; with ``"feature"`` RD reprograms the cached features.
- :func:`run_fm_method`, :func:`run_student_method`: train one method for one seed with ``mdbench.train.fit``
  and score it on the test split; :func:`run` runs every method, student and seed of one dataset at one
  label fraction; :func:`record` turns its runs into Table 1, spread and gain records, with the per-image test
  outputs behind Table 1 and gain (units: the test images' ids, shared by every row of a dataset).
- :func:`deployment_costs`: Table 2 (deployed parameters, FLOPs and CPU latency of students against the FM, every
  model at the same input size).

Training length is a number of optimizer steps (``Config.steps``), the same for the full and the low-data
setting, so a 10% run is not also a shorter run; ``Config.epochs`` lengthens a run on many images to that many
passes over them (:func:`run_steps`). Training data live on the training device and batches are gathered there
(:func:`_loader`), in the order a shuffling ``DataLoader`` gives; with ``Config.resident_batches`` each epoch's
order is drawn once and copied to the device, so that no step waits for the GPU (``Config.log_every``: how often
the loss is read back).
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.model_selection import train_test_split
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from mdbench import efficiency, figures, train, tuning
from mdbench import samples as sample_outputs
from mdbench.data.base import RealDataset
from mdbench.data.registry import is_present, load_dataset
from mdbench.data.synthetic import SyntheticClassification
from mdbench.losses.kd import HintLoss, RKDLoss, kd_loss
from mdbench.metrics import classification_metrics
from mdbench.models import PretrainedWeightsNotFoundWarning, build_model, frozen_norms_to_eval
from mdbench.models.reprogramming import (
    DeployedStudent,
    FeatureReprogrammer,
    FrozenFM,
    InputReprogrammer,
    ProjectedStudent,
    RDObjective,
    RDStep,
    ReprogrammingDistillation,
    Standardise,
    build_fm,
)
from mdbench.models.timm_backbones import weight_search_locations
from mdbench.params import NotebookConfig
from mdbench.repro import seed_rngs
from mdbench.work import Work, uncached

FM_METHODS = ("fm_linear_probe", "fm_full_ft", "fm_lora", "fm_vpt")
STUDENT_METHODS = ("student", "kd", "fitnet", "rkd", "rd_no_cka", "rd_no_reprogramming", "rd")
KD_BASELINES = ("kd", "fitnet", "rkd")
RD_METHODS = ("rd_no_cka", "rd_no_reprogramming", "rd")
# the student rows the paper's claims compare (paper.yaml): RD against each KD baseline, and RD without CKA (spread)
CLAIM_METHODS = ("kd", "fitnet", "rkd", "rd_no_cka", "rd")
PHI_SPACES = ("image", "feature")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    """Images (N, 3, H, W) in [0, 1], labels (N,) int64, ids (N,) int64 and, once cached, FM features (N, D_t).

    ``ids``: each image's index in its dataset's split (the registry's train or test split, or the synthetic
    set's), a stable name for it whatever sample of the split is kept; the per-image outputs of every method are
    keyed by it.
    """

    x: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.shape[1] != 3 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"a split needs images (N, 3, H, W) and labels (N,), got {tuple(self.x.shape)} and "
                             f"{tuple(self.y.shape)}")
        if self.ids.shape != (len(self.y),) or len(np.unique(self.ids)) != len(self.ids):
            raise ValueError(f"a split needs one distinct id per image, got ids of shape {self.ids.shape} for "
                             f"{len(self.y)} images")
        if self.features is not None and len(self.features) != len(self.y):
            raise ValueError(f"{len(self.features)} cached features for {len(self.y)} images")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> Split:
        """The images at ``index`` (a CPU tensor of positions)."""
        return Split(self.x[index], self.y[index], self.ids[index.numpy()],
                     None if self.features is None else self.features[index])

    def to(self, device: str | torch.device) -> Split:
        """This split with its tensors on ``device`` (the same tensors where they are there already)."""
        return Split(self.x.to(device), self.y.to(device), self.ids,
                     None if self.features is None else self.features.to(device))


@dataclass
class ClassificationData:
    """One dataset's train and test splits in memory; ``checksum`` identifies the data the numbers came from."""

    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    checksum: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: str | torch.device) -> ClassificationData:
        """Both splits' tensors on ``device``: what a grid trains on, moved once rather than once per run."""
        return ClassificationData(self.name, self.train.to(device), self.test.to(device), self.classes,
                                  self.checksum)


def _stratified(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a stratified sample of ``n`` of the labels ``y`` (all of them when n is None or >= len)."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    keep, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(keep)


def _stack(dataset, index: Iterable[int]) -> Split:
    """The items ``index`` of ``dataset`` as a split whose ids are those indices."""
    ids = np.asarray(list(index), dtype=np.int64)
    items = [dataset[int(i)] for i in ids]
    return Split(torch.stack([x for x, _ in items]).float(), torch.tensor([int(y) for _, y in items]), ids)


def load_classification(name: str, image_size: int, data_dir: str | None = None, max_train: int | None = None,
                        max_test: int | None = None, synthetic_classes: int = 2) -> ClassificationData:
    """A classification dataset's train and test splits as tensors of RGB images at ``image_size``.

    Args:
        name: ``"synthetic"`` (:class:`SyntheticClassification`, ``max_train``/``max_test`` images, which must be
            given) or a registry dataset: ``pneumoniamnist``, ``pbc``, ``isic2017`` (official or seeded splits).
        image_size: side of the square images (bilinear resize; grey images are repeated to 3 channels).
        max_train, max_test: keep a stratified sample of at most this many images (seed 0), for CPU-scale runs.
        synthetic_classes: number of classes of the synthetic set.
    """
    if name == "synthetic":
        if max_train is None or max_test is None:
            raise ValueError("the synthetic dataset needs max_train and max_test (its sizes)")
        splits = {split: SyntheticClassification(n, synthetic_classes, image_size, channels=3, seed=0, split=split)
                  for split, n in (("train", max_train), ("test", max_test))}
        checksum = hashlib.sha256((splits["train"].checksum + splits["test"].checksum).encode()).hexdigest()
        return ClassificationData(name, _stack(splits["train"], range(max_train)),
                                  _stack(splits["test"], range(max_test)), splits["train"].classes, checksum)
    # the registry types its result as Dataset; every real dataset's loader is a RealDataset (classes, checksum)
    real = {split: cast(RealDataset, load_dataset(name, split=split, data_dir=data_dir, image_size=image_size,
                                                  channels=3)) for split in ("train", "test")}
    tensors = {split: _stack(ds, _stratified(np.asarray([int(l) for l in _labels(ds)]), cap, seed=0))
               for (split, ds), cap in zip(real.items(), (max_train, max_test), strict=False)}
    return ClassificationData(name, tensors["train"], tensors["test"], tuple(real["train"].classes),
                              real["train"].checksum)


def _labels(dataset) -> list[int]:
    """Labels of a registry classification dataset's split, in item order, without reading any image."""
    return np.asarray(dataset.labels)[dataset.indices].tolist()


def cache_features(data: ClassificationData, fm: FrozenFM, batch_size: int = 64, amp: bool = False
                   ) -> ClassificationData:
    """Store the frozen FM's features (float32, on the CPU) of the (un-reprogrammed) train and test images in
    ``data``, once; with ``amp`` the FM runs under bf16 autocast (on a GPU)."""
    device = next(fm.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for split in (data.train, data.test):
            split.features = fm.cache(split.x, batch_size).float()
    return data


def load_data(cfg: Config) -> tuple[FrozenFM, dict[str, ClassificationData]]:
    """The frozen FM ``cfg.fm`` and each dataset of ``cfg.datasets`` as tensors at ``cfg.image_size``, with the
    FM's features of its images cached."""
    missing = [d for d in cfg.datasets if d != "synthetic" and not is_present(d, cfg.data_dir)]
    if missing:
        raise FileNotFoundError(f"datasets {missing} are not under the data root: set MDBENCH_DATA_DIR (or data_dir) "
                                "to the folder holding them, or run the smoke profile on synthetic data")
    fm = _on_device(FrozenFM(build_fm(cfg.fm, input_size=None if cfg.fm == "litemedsam" else cfg.image_size)), cfg)
    return fm, {name: cache_features(load_classification(name, cfg.image_size, data_dir=cfg.data_dir,
                                                         max_train=cfg.max_train, max_test=cfg.max_test), fm,
                                     amp=cfg.amp)
                for name in cfg.datasets}


def _on_device(module: ModuleT, cfg: Config) -> ModuleT:
    """``module`` on ``cfg.device``; on a GPU with channels-last convolution weights (faster bf16 kernels)."""
    module.to(cfg.device)
    if torch.device(cfg.device).type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module


def label_subset(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified ``fraction`` of the labels ``y`` (the low-data setting), drawn with ``seed``;
    at least one image per class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = y.cpu().numpy()
    n_classes = len(np.unique(labels))
    n = max(n_classes, round(fraction * len(labels)))
    try:
        return torch.from_numpy(_stratified(labels, n, seed))
    except ValueError as err:
        raise ValueError(f"cannot draw {n} of {len(labels)} labels stratified by class: {err}") from err


@dataclass
class Task:
    """One dataset at one label fraction for one seed: what every method of that cell of Table 1 trains on."""

    label: str
    fraction: float
    train: Split
    test: Split
    num_classes: int
    fm: FrozenFM


def fraction_label(name: str, fraction: float) -> str:
    """The dataset label of a table row: ``name`` for full data, ``name-10pct`` for 10% of the labels."""
    return name if fraction == 1 else f"{name}-{round(100 * fraction)}pct"


def make_task(data: ClassificationData, fm: FrozenFM, fraction: float, seed: int) -> Task:
    """The task of ``data`` at ``fraction`` of its training labels (``seed`` draws which ones). Its FM and cached
    features are standardised by the statistics of every training image's features (:meth:`FrozenFM.followed_by`;
    no labels, so the low-data fraction uses them too)."""
    if data.train.features is None or data.test.features is None:
        raise ValueError("call cache_features(data, fm) first: the FM features are computed once per dataset")
    scaler = Standardise.fit(data.train.features)
    task_fm = fm.followed_by(scaler)

    def standardise(split: Split) -> Split:
        assert split.features is not None
        return replace(split, features=scaler(split.features))

    train_split = standardise(data.train.subset(label_subset(data.train.y, fraction, seed)))
    return Task(fraction_label(data.name, fraction), fraction, train_split, standardise(data.test), data.num_classes,
                task_fm)


# ------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Config(NotebookConfig):
    """The notebook's parameters; the training settings are shared by every method (recorded with each result)."""

    selectors: ClassVar[tuple[str, ...]] = ("seeds", "datasets", "fractions")  # name the units of work

    datasets: tuple[str, ...] = ("pneumoniamnist", "pbc", "isic2017")
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = (1.0, 0.1)  # of the training labels: 1.0 all, 0.1 the low-data setting
    students: tuple[str, ...] = ("resnet18",)  # every student method of `methods` on every dataset and fraction
    claim_students: tuple[str, ...] = ()  # CLAIM_METHODS only, on claim_datasets (empty: every dataset)
    claim_datasets: tuple[str, ...] = ()
    methods: tuple[str, ...] = FM_METHODS + STUDENT_METHODS
    fm: str = "litemedsam"      # litemedsam (256x256) | litemedsam_stem (pretrained first stage, any size)
    phi_space: str = "image"    # RD's reprogrammer: image (before the FM, which then runs every step) | feature
    image_size: int = 28        # side of the images the students (and the stem stand-in) see
    max_train: int | None = None  # stratified caps per dataset, before the label fraction
    max_test: int | None = None
    latency_repeats: int = 10   # Table 2
    steps: int = 100            # optimizer steps per run (full and low-data alike)
    epochs: float = 0.0         # ... or more: at least this many passes over a run's training images (run_steps)
    batch_size: int = 32
    lr: float = 1e-3            # students, heads, reprogrammer, PEFT parameters (AdamW)
    fm_lr: float = 1e-4         # full fine-tuning of the FM
    temperature: float = 4.0    # KD temperature (RD and Hinton KD)
    alpha: float = 1.0          # KD weight
    beta: float = 1.0           # CKA weight (RD)
    decay: bool = True          # RD: KD and CKA weights fall linearly to 0 over training (DRD's schedule)
    hint_weight: float = 1.0    # FitNet
    rkd_weights: tuple[float, float] = (25.0, 50.0)  # RKD distance, angle
    reprogrammer_hidden: int = 32
    projector: str = "linear"
    lora_rank: int = 8
    vpt_tokens: int = 10
    pretrained_students: bool = False  # ImageNet weights (the paper's): from MDBENCH_WEIGHTS_DIR, never downloaded;
    #                                    a run that asks for them and finds none stops (initial_student)
    device: str = "cpu"
    resident_batches: bool = False  # the same batches, drawn on the device without host work per step (_loader)
    epoch_batches: int = 0      # with resident_batches: train.fit's epochs of whole passes, at least this many batches
    log_every: int = 10         # train.fit reads the loss back (a host-device sync) every this many steps

    def __post_init__(self) -> None:
        if self.phi_space not in PHI_SPACES:
            raise ValueError(f"phi_space must be one of {PHI_SPACES}, got {self.phi_space!r}")
        if self.epochs < 0 or self.steps < 1:
            raise ValueError(f"need steps >= 1 and epochs >= 0, got {self.steps} and {self.epochs}")
        if self.epoch_batches < 0 or (self.epoch_batches and not self.resident_batches):
            raise ValueError(f"epoch_batches must be >= 0, and needs resident_batches (which draws the passes of an "
                             f"epoch); got {self.epoch_batches} with resident_batches={self.resident_batches}")
        if set(self.students) & set(self.claim_students):
            raise ValueError(f"students {sorted(set(self.students) & set(self.claim_students))} are in both "
                             "students (every method) and claim_students (the claims' methods)")
        if not set(self.claim_datasets) <= set(self.datasets):
            raise ValueError(f"claim_datasets {sorted(set(self.claim_datasets) - set(self.datasets))} are not "
                             f"among the datasets {list(self.datasets)}")

    @property
    def amp(self) -> bool:
        """Mixed precision where it pays: on a GPU."""
        return self.device == "cuda"

    def students_of(self, dataset: str) -> list[str]:
        """The students that train on ``dataset``: every one of ``students``, and the ``claim_students`` where
        ``claim_datasets`` holds it (or is empty)."""
        claims = self.claim_students if not self.claim_datasets or dataset in self.claim_datasets else ()
        return [*self.students, *claims]

    def as_record(self) -> dict[str, Any]:
        return {**super().as_record(), "amp": self.amp}


@dataclass(frozen=True)
class TestScores:
    """A model's outputs on the test split, in the split's order: class probabilities ``probs`` (N_test, K),
    float64, and the accuracy and macro AUC (%) computed from exactly those probabilities."""

    probs: np.ndarray
    metrics: dict[str, float]


@dataclass
class MethodResult:
    """The test scores of one trained method, and what other methods reuse."""

    test: TestScores
    model: nn.Module
    train_logits: torch.Tensor | None = None      # FM methods: logits on the training images (a KD teacher)
    extra: dict[str, TestScores] = field(default_factory=dict)  # rd: "teacher", its reprogrammed-FM path
    history: train.History | None = None          # what train.fit did: steps, seconds and losses per epoch


class _Batches:
    """Batches ``tuple(t[index] for t in tensors)`` of tensors kept on one device, the positions drawn by ``index``
    (a ``DataLoader`` over ``TensorDataset(arange(N))``): the batches a ``DataLoader`` over the tensors themselves
    gives, in the same order (its sampler and generator are the same), without copying every image through the
    host at every step."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], index: DataLoader, device: str | torch.device) -> None:
        self.tensors = tuple(t.to(device) for t in tensors)
        self.index = index

    @property
    def generator(self) -> torch.Generator | None:
        """The shuffling generator, which ``train.fit`` keeps in its checkpoints."""
        return self.index.generator

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # The DataLoader's iterator is made here, not at the first batch: making one draws from the generator, and
        # train.fit's progress bar calls iter() once more than it iterates (the order must stay the DataLoader's).
        positions = iter(self.index)
        return (tuple(t[index.to(t.device)] for t in self.tensors) for (index,) in positions)


class _ResidentBatches:
    """The batches of :class:`_Batches`, in the same order, with no host work per step.

    ``_Batches`` asks a ``DataLoader`` for each batch's positions: per step, a Python call per image to collate
    them and a blocking copy of the positions to the device for each tensor, which waits for the GPU to finish
    the steps queued before it, so the host cannot run ahead. Here each pass over the images draws its permutation
    from the same generator with the same draws as the ``DataLoader`` (one int64 for its base seed when an iterator
    is made, ``RandomSampler``'s ``randperm(N)`` at the first batch and one more when the pass's batches run out),
    copies it to the device once, and every batch is an ``index_select`` of a slice of it on the device: full
    batches only, like ``drop_last``. Without a generator the batches are consecutive slices of the tensors, in
    order, the last one short; the base seed is drawn all the same (from the global generator, as a ``DataLoader``
    without one does), so later random numbers match too.

    One iteration (an epoch of ``train.fit``, which reads its losses back and snapshots the weights after it) runs
    ``passes`` passes, one after another, with the draws of as many ``DataLoader`` epochs: each pass draws the base
    seeds of as many iterators as its consumer made for the first (``train.fit`` makes two an epoch: its progress
    bar makes one when built), so the batches and their order are those of a ``DataLoader`` over as many epochs.

    Args:
        tensors: tensors of one length N on ``device`` (or moved there once), e.g. images (N, 3, H, W), labels (N,).
        batch_size: B (at most N when shuffling).
        generator: the shuffling generator; None for in-order batches.
        passes: passes over the images an iteration makes (shuffled batches only).
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator | None,
                 device: str | torch.device, passes: int = 1) -> None:
        self.tensors = tuple(t.to(device) for t in tensors)
        self.n, self.batch_size, self.generator, self.passes = len(self.tensors[0]), batch_size, generator, passes
        self._iterators = 0  # made since the last epoch began
        if generator is not None and not 1 <= batch_size <= self.n:
            raise ValueError(f"shuffled full batches of {batch_size} need 1 to {self.n} (the images), got "
                             f"{batch_size}")
        if passes < 1 or (passes > 1 and generator is None):
            raise ValueError(f"passes must be >= 1, and 1 for in-order batches; got {passes}")

    def __len__(self) -> int:
        if self.generator is None:
            return math.ceil(self.n / self.batch_size)
        return self.passes * (self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # drawn when the iterator is made, as a DataLoader draws its base seed (from the global generator without one)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        if self.generator is None:
            return (tuple(t[i:i + self.batch_size] for t in self.tensors) for i in range(0, self.n, self.batch_size))
        self._iterators += 1
        return self._shuffled()

    def _shuffled(self) -> Iterator[tuple[torch.Tensor, ...]]:
        iterators, self._iterators = self._iterators, 0
        for done in range(self.passes):
            for _ in range(iterators if done else 0):  # the next DataLoader epoch's iterators
                torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            # from pageable memory an asynchronous copy is staged at once: the host does not wait for the GPU
            permutation = torch.randperm(self.n, generator=self.generator).to(self.tensors[0].device,
                                                                               non_blocking=True)
            for i in range(self.n // self.batch_size):
                index = permutation[i * self.batch_size:(i + 1) * self.batch_size]
                yield tuple(t.index_select(0, index) for t in self.tensors)
            # asked for one batch more, RandomSampler runs out, drawing its (empty) remainder's permutation on the way
            torch.randperm(self.n, generator=self.generator)


def _loader(tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int | None, cfg: Config
            ) -> _Batches | _ResidentBatches:
    """Shuffled, full batches for training (BatchNorm and CKA need >= 2 samples) when ``seed`` is given; in order
    otherwise; gathered on ``cfg.device``, by :class:`_ResidentBatches` with ``cfg.resident_batches`` (the same
    batches; a training epoch of at least ``cfg.epoch_batches`` of them), else by :class:`_Batches`."""
    size = min(batch_size, len(tensors[0]))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if cfg.resident_batches:
        passes = 1 if generator is None else epoch_passes(len(tensors[0]), cfg)
        return _ResidentBatches(tensors, size, generator, cfg.device, passes)
    positions = TensorDataset(torch.arange(len(tensors[0])))
    if generator is None:
        return _Batches(tensors, DataLoader(positions, batch_size=size), cfg.device)
    return _Batches(tensors, DataLoader(positions, batch_size=size, shuffle=True, drop_last=True,
                                        generator=generator), cfg.device)


def epoch_passes(n_train: int, cfg: Config) -> int:
    """Passes over ``n_train`` training images in full batches that one epoch of ``train.fit`` makes: the fewest
    that hold ``cfg.epoch_batches`` batches (1 without it)."""
    return max(1, math.ceil(cfg.epoch_batches / (n_train // min(cfg.batch_size, n_train))))


def run_steps(n_train: int, cfg: Config) -> int:
    """Optimizer steps of one run on ``n_train`` training images: ``cfg.steps``, or more where ``cfg.epochs``
    passes over the images in full batches of ``cfg.batch_size`` take more."""
    if n_train < 1:
        raise ValueError("a run needs at least one training image")
    return max(cfg.steps, math.ceil(cfg.epochs * (n_train // min(cfg.batch_size, n_train))))


def _fit(model: nn.Module, tensors: tuple[torch.Tensor, ...], step_fn, cfg: Config, seed: int,
         lr: float) -> train.History:
    steps = run_steps(len(tensors[0]), cfg)
    loader = _loader(tensors, cfg.batch_size, seed, cfg)
    _on_device(model, cfg)
    # fused AdamW: one kernel for all parameters, several times faster than the default on CPU as well
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    return train.fit(model, loader, step_fn=step_fn, optimizer=optimizer, epochs=math.ceil(steps / len(loader)),
                     max_steps=steps, device=cfg.device, amp=cfg.amp, progress=False, seed=seed,
                     log_every=cfg.log_every)


def _scores(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> TestScores:
    """Softmax probabilities (float64) of ``logits`` (N, K) and their accuracy and macro AUC (%) against ``y``
    (N,), computed as :func:`mdbench.samples.aggregate` recomputes them from the per-image outputs."""
    probs = softmax(logits.double().numpy(), axis=1)
    scores = classification_metrics(y.numpy(), probs, num_classes=num_classes)
    return TestScores(probs, {"accuracy": scores["accuracy"] * 100, "auc": scores["auc"] * 100})


def _evaluate(model: nn.Module, tensors: tuple[torch.Tensor, ...], num_classes: int, cfg: Config,
              fn: Callable | None = None) -> TestScores:
    """Test scores of ``fn(model, batch) -> (logits, y)`` (default ``model(x)``) over ``tensors``, in order."""
    logits, y = train.predict(model, _loader(tensors, 256, None, cfg), cfg.device, fn)
    return _scores(logits.float(), y, num_classes)


def _precise_bn(model: nn.Module, images: torch.Tensor, cfg: Config) -> None:
    """Recompute ``model``'s BatchNorm statistics as exact averages over ``images`` (no weight changes).

    A short run's running averages (momentum 0.1) lag behind the weights and can collapse eval-mode predictions to
    one class; every trained model is scored after this. Only for modules whose BatchNorms all train: a frozen
    FM's statistics must stay as they are.
    """
    with torch.no_grad():
        update_bn(_loader((images,), 256, None, cfg), model.to(cfg.device), device=torch.device(cfg.device))


def _ce_step(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y), {}


# ------------------------------------------------------------------------------------------------- FM baselines
class FMClassifier(nn.Module):
    """FM encoder (frozen, fine-tuned or with adapters) + linear head: (B, 3, H, W) -> (B, K); deploys FM cost.

    The head sees ``standardise(encoder(x))``: a copy of the task FM's standardisation for an encoder copied out of
    it, none for a :class:`FrozenFM`, which standardises itself. In training mode the BatchNorms whose weights are
    frozen (LoRA, VPT) stay in eval mode, so the FM's running statistics do not move.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int,
                 standardise: Standardise | None = None) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(feature_dim, num_classes)
        self.standardise = nn.Identity() if standardise is None else copy.deepcopy(standardise)

    def train(self, mode: bool = True) -> FMClassifier:
        super().train(mode)
        return frozen_norms_to_eval(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardise(self.encoder(x)))


_TUNING = {"fm_full_ft": "full", "fm_lora": "lora", "fm_vpt": "vpt"}


def _adapted_fm(method: str, task: Task, cfg: Config) -> FMClassifier:
    """A copy of the FM with a head, set up by ``mdbench.tuning`` for full fine-tuning, LoRA or VPT (the frozen FM
    of the task stays untouched)."""
    encoder = copy.deepcopy(task.fm.encoder)
    by_method: dict[str, dict[str, Any]] = {"fm_lora": {"r": cfg.lora_rank, "target_modules": encoder.lora_targets},
                                            "fm_vpt": {"num_prompts": cfg.vpt_tokens}}
    options = by_method.get(method, {})
    model = FMClassifier(encoder, encoder.feature_dim, task.num_classes, standardise=task.fm.standardise)
    return tuning.apply_method(model, _TUNING[method], backbone="encoder", **options)


def run_fm_method(method: str, task: Task, seed: int, cfg: Config, teacher: bool = True) -> MethodResult:
    """Adapt the FM to the task with ``method`` (one of :data:`FM_METHODS`) and score it on the test split.

    The linear probe trains a head on the cached (standardised) features; the others run the FM at every step.
    With ``teacher``, ``train_logits`` holds the adapted FM's logits on the training images, for Hinton KD.
    """
    if method not in FM_METHODS:
        raise ValueError(f"unknown FM method {method!r}; choose one of {FM_METHODS}")
    seed_rngs(seed)
    train_split, test_split = task.train, task.test
    if method == "fm_linear_probe":
        # make_task refuses data without cached FM features, and subsets keep them
        assert train_split.features is not None and test_split.features is not None
        head = nn.Linear(task.fm.feature_dim, task.num_classes)
        history = _fit(head, (train_split.features, train_split.y), _ce_step, cfg, seed, cfg.lr)
        scores = _evaluate(head, (test_split.features, test_split.y), task.num_classes, cfg)
        train_logits = _predict(head, train_split.features, cfg) if teacher else None
        return MethodResult(scores, FMClassifier(task.fm, task.fm.feature_dim, task.num_classes), train_logits,
                            history=history)
    model = _adapted_fm(method, task, cfg)
    history = _fit(model, (train_split.x, train_split.y), _ce_step, cfg, seed,
                   cfg.fm_lr if method == "fm_full_ft" else cfg.lr)
    if method == "fm_full_ft":  # LoRA and VPT keep the FM's BatchNorms frozen
        _precise_bn(model, train_split.x, cfg)
    scores = _evaluate(model, (test_split.x, test_split.y), task.num_classes, cfg)
    train_logits = _predict(model, train_split.x, cfg) if teacher else None
    return MethodResult(scores, model, train_logits, history=history)


def _predict(model: nn.Module, inputs: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``model``'s outputs on ``inputs`` (N, ...), in order, on the CPU."""
    return train.predict(model, _loader((inputs,), 256, None, cfg), cfg.device)[0]


# ------------------------------------------------------------------------------------------------- student methods
class DistilledStudent(nn.Module):
    """A student with its own classifier (what is deployed) and the auxiliary module of its KD loss (dropped)."""

    def __init__(self, student: ProjectedStudent, num_classes: int, aux: nn.Module | None = None) -> None:
        super().__init__()
        self.deployed = DeployedStudent(student, nn.Linear(student.embed_dim, num_classes))
        self.aux = aux


def _kd_step(method: str, cfg: Config):
    """``CE(l_s, y)`` plus the method's distillation term on batches ``(x, y[, teacher logits or FM features])``."""

    def step(model: DistilledStudent, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, *teacher = batch
        features, projected = model.deployed.student(x)
        logits = model.deployed.classifier(projected)
        ce = F.cross_entropy(logits, y)
        if method == "student":
            return ce, {"ce": ce.detach()}
        if method == "kd":
            term = cfg.alpha * kd_loss(logits, teacher[0], cfg.temperature)
            return ce + term, {"ce": ce.detach(), method: term.detach()}
        assert model.aux is not None  # run_student_method builds FitNet's and RKD's students with their loss module
        if method == "fitnet":
            term = cfg.hint_weight * model.aux(features, teacher[0])
        else:  # rkd
            term = model.aux(features, teacher[0])
        return ce + term, {"ce": ce.detach(), method: term.detach()}

    return step


def initial_student(name: str, task: Task, seed: int, cfg: Config) -> ProjectedStudent:
    """The timm student ``name`` (projecting to the FM's width) as every method of ``seed`` starts it."""
    seed_rngs(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # asked for ImageNet weights and none on disk: stop, rather than train from random init under that config
        warnings.simplefilter("error", PretrainedWeightsNotFoundWarning)
        try:
            # build_model returns nn.Module: the registry's "projected_student" builds a ProjectedStudent
            return cast(ProjectedStudent, build_model("projected_student", backbone=name,
                                                      embed_dim=task.fm.feature_dim, image_size=task.train.x.shape[-1],
                                                      pretrained=cfg.pretrained_students, projector=cfg.projector))
        except PretrainedWeightsNotFoundWarning:
            raise FileNotFoundError(
                f"pretrained_students is set, but the student {name!r} has no weights on disk (looked in: "
                f"{'; '.join(weight_search_locations(name))}): put them there, or set pretrained_students=False "
                "(random init, as the profiles run)") from None


def run_student_method(method: str, task: Task, initial: ProjectedStudent, seed: int, cfg: Config,
                       teacher_logits: torch.Tensor | None = None) -> MethodResult:
    """Train a copy of the student ``initial`` with ``method`` (one of :data:`STUDENT_METHODS`) and score it.

    Pass the same :func:`initial_student` to every method of one seed, so all start from the same weights (and
    timm builds each student once). ``kd`` needs ``teacher_logits`` (N_train, K)
    of the fine-tuned FM; FitNet, RKD and RD without reprogramming use the cached FM features. For ``rd``,
    ``extra["teacher"]`` scores the reprogrammed FM path ``g(F_t(phi(x)))`` too.
    """
    if method not in STUDENT_METHODS:
        raise ValueError(f"unknown student method {method!r}; choose one of {STUDENT_METHODS}")
    if method == "kd" and teacher_logits is None:
        raise ValueError("Hinton KD needs teacher_logits: the fine-tuned FM's logits on the training images")
    seed_rngs(seed)
    student = copy.deepcopy(initial)
    tr, te = task.train, task.test
    if method in RD_METHODS:
        reprogrammer = None if method == "rd_no_reprogramming" else _reprogrammer(task, cfg)
        model = ReprogrammingDistillation(task.fm, student, task.num_classes, reprogrammer)
        objective = RDObjective(cfg.alpha, 0.0 if method == "rd_no_cka" else cfg.beta, cfg.temperature)
        # F_t(x) does not change unless phi reprograms the FM's input: then it is the cached feature
        cached = not isinstance(reprogrammer, InputReprogrammer)
        assert tr.features is not None and te.features is not None  # make_task refuses data without them
        train_tensors = (tr.x, tr.y, tr.features) if cached else (tr.x, tr.y)
        history = _fit(model, train_tensors, RDStep(objective, run_steps(len(tr), cfg), cfg.decay), cfg, seed, cfg.lr)
        deployed = model.deployed()
        _precise_bn(deployed, tr.x, cfg)
        if reprogrammer is not None:
            _precise_bn(reprogrammer, tr.features if cached else tr.x, cfg)
        result = MethodResult(_evaluate(deployed, (te.x, te.y), task.num_classes, cfg), deployed, history=history)
        if method == "rd":
            result.extra["teacher"] = _evaluate(model, (te.x, te.y, te.features) if cached else (te.x, te.y),
                                                task.num_classes, cfg, lambda m, b: (m(b[0], *b[2:]).teacher_logits, b[1]))
        return result
    aux = {"fitnet": lambda: HintLoss(student.feature_dim, task.fm.feature_dim),
           "rkd": lambda: RKDLoss(*cfg.rkd_weights)}.get(method, lambda: None)()
    distilled = DistilledStudent(student, task.num_classes, aux)
    extra_tensor = {"kd": teacher_logits, "fitnet": tr.features, "rkd": tr.features}.get(method)
    train_tensors = (tr.x, tr.y) if extra_tensor is None else (tr.x, tr.y, extra_tensor)
    history = _fit(distilled, train_tensors, _kd_step(method, cfg), cfg, seed, cfg.lr)
    _precise_bn(distilled.deployed, tr.x, cfg)
    return MethodResult(_evaluate(distilled.deployed, (te.x, te.y), task.num_classes, cfg), distilled.deployed,
                        history=history)


def _reprogrammer(task: Task, cfg: Config) -> InputReprogrammer | FeatureReprogrammer:
    """RD's phi where ``cfg.phi_space`` puts it: on the images (3 channels) or on the FM's pooled features."""
    # build_model returns nn.Module: these registry names build an InputReprogrammer and a FeatureReprogrammer
    if cfg.phi_space == "image":
        return cast(InputReprogrammer, build_model("input_reprogrammer", channels=3, hidden=cfg.reprogrammer_hidden))
    return cast(FeatureReprogrammer, build_model("feature_reprogrammer", dim=task.fm.feature_dim,
                                                 hidden=cfg.reprogrammer_hidden))


# ------------------------------------------------------------------------------------------------- the grid
def unavailable_methods(methods: Iterable[str], fm: FrozenFM) -> dict[str, str]:
    """``{method: reason}`` for the methods of ``methods`` that cannot run on this FM."""
    if "fm_vpt" in methods and not fm.encoder.has_attention:
        return {"fm_vpt": f"VPT prompts attention layers, and the FM {fm.name!r} has none"}
    return {}


def run(data: ClassificationData, fm: FrozenFM, fraction: float, methods: Iterable[str], cfg: Config,
        progress: bool = True, work: Work = uncached) -> pd.DataFrame:
    """Every method of ``methods`` for every seed and student of ``cfg`` on ``data`` at one label fraction.

    Each seed draws its own label subset (:func:`make_task`). Hinton KD's teacher is the fully fine-tuned FM when
    ``fm_full_ft`` runs, else the linear probe; it trains once per seed and its logits serve every student. The
    ``students`` train every student method of ``methods``, the ``claim_students`` (where ``claim_datasets`` holds
    ``data``) only those of :data:`CLAIM_METHODS`. The data move to ``cfg.device`` once. Each seed is one unit of
    ``work`` (dataset, fraction, seed: :func:`run_seed`). With ``progress``, a bar and one line per seed say how far
    the grid is.

    Returns:
        One row per (method, student, seed): ``dataset`` (the task label), ``name`` (the dataset's), ``fraction``,
        ``method``, ``student`` ("—" for FM methods), ``seed``, ``accuracy``, ``auc`` (%), ``probs`` (the
        (N_test, K) test probabilities they were computed from, in the order of ``data.test``, which every row
        shares), ``kd_teacher``, ``init`` (where the weights came from), ``steps`` and ``seconds`` (optimizer
        steps and the time they took) and ``curve`` (:func:`training_curve`). ``rd`` adds a row for its
        reprogrammed-FM path, method ``rd_teacher`` (no steps of its own: 0, no curve).
    """
    methods = list(methods)
    unknown = sorted(set(methods) - set(FM_METHODS) - set(STUDENT_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {FM_METHODS + STUDENT_METHODS}")
    fm_methods = [m for m in FM_METHODS if m in methods]
    student_methods = [m for m in STUDENT_METHODS if m in methods]
    teacher_method = next((m for m in ("fm_full_ft", "fm_linear_probe") if m in fm_methods), None)
    if "kd" in student_methods and teacher_method is None:
        raise ValueError("Hinton KD distils the fine-tuned FM: add fm_full_ft or fm_linear_probe to methods")
    grid = [(student, [m for m in student_methods if m in CLAIM_METHODS or student in cfg.students])
            for student in cfg.students_of(data.name)]
    rows: list[dict[str, Any]] = []
    seeds, label = cfg.seeds, fraction_label(data.name, fraction)
    on_device = data.to(cfg.device)
    per_seed = len(fm_methods) + sum(len(m) for _, m in grid)
    bar = tqdm(total=len(seeds) * per_seed, desc=label, disable=not progress)
    start = time.perf_counter()
    for done, seed in enumerate(seeds, 1):
        rows += work("seed", partial(run_seed, on_device, fm, fraction, fm_methods, grid, teacher_method, cfg, seed,
                                     bar), dataset=data.name, fraction=fraction, seed=seed)
        bar.update(per_seed)
        if progress:
            _report_progress(label, done, len(seeds), time.perf_counter() - start, rows)
    bar.close()
    return pd.DataFrame(rows)


def run_seed(data: ClassificationData, fm: FrozenFM, fraction: float, fm_methods: list[str],
             grid: list[tuple[str, list[str]]], teacher_method: str | None, cfg: Config, seed: int,
             bar: Any = None) -> list[dict[str, Any]]:
    """The rows of :func:`run` of one seed (a unit of work): every FM method, then every (student, its methods) of
    ``grid``; ``bar`` (a tqdm bar) shows which is training."""
    seed_task = make_task(data, fm, fraction, seed)
    base = {"dataset": seed_task.label, "name": data.name, "fraction": fraction, "seed": seed,
            "kd_teacher": teacher_method or "—"}
    rows: list[dict[str, Any]] = []
    teacher_logits = None
    for method in fm_methods:
        if bar is not None:
            bar.set_postfix_str(f"seed {seed} {method}")
        result = run_fm_method(method, seed_task, seed, cfg, teacher=method == teacher_method)
        if method == teacher_method:
            teacher_logits = result.train_logits
        rows.append({**base, "method": method, "student": "—", "init": fm.encoder.mdbench_init,
                     **result.test.metrics, "probs": result.test.probs, **_training(result.history)})
    for student, methods_of_student in grid:
        initial = initial_student(student, seed_task, seed, cfg)
        for method in methods_of_student:
            if bar is not None:
                bar.set_postfix_str(f"seed {seed} {student} {method}")
            result = run_student_method(method, seed_task, initial, seed, cfg, teacher_logits)
            row = {**base, "student": student, "init": initial.mdbench_init}
            rows.append({**row, "method": method, **result.test.metrics, "probs": result.test.probs,
                         **_training(result.history)})
            for name, scores in result.extra.items():
                rows.append({**row, "method": f"{method}_{name}", **scores.metrics, "probs": scores.probs,
                             **_training(None)})
    return rows


def _training(history: train.History | None) -> dict[str, Any]:
    """A run's ``steps``, training ``seconds`` and ``curve`` for :func:`run`'s rows (0, 0.0, None without one)."""
    if history is None:
        return {"steps": 0, "seconds": 0.0, "curve": None}
    return {"steps": history.global_step, "seconds": sum(e["seconds"] for e in history.epochs),
            "curve": training_curve(history)}


def training_curve(history: train.History) -> np.ndarray:
    """(E, 2) float64: per epoch of ``history``, the optimizer steps so far and the mean training cross-entropy of
    the model that is scored (the student's path for student methods, the classifier's for FM methods)."""
    key = next(k for k in ("train_ce_student", "train_ce", "train_loss") if k in history.epochs[0])
    return np.array([[epoch["step"], epoch[key]] for epoch in history.epochs], dtype=np.float64)


def _report_progress(label: str, done: int, total: int, seconds: float, rows: list[dict[str, Any]]) -> None:
    """One line after each seed of a grid: how far it is, how long it took and the mean time per optimizer step."""
    steps, train_s = sum(r["steps"] for r in rows), sum(r["seconds"] for r in rows)
    left = seconds / done * (total - done)
    print(f"{label}: seed {done}/{total} after {seconds / 60:.1f} min (about {left / 60:.1f} min left); "
          f"{steps} steps at {1e3 * train_s / max(steps, 1):.1f} ms each", flush=True)


class TableRecords(NamedTuple):
    """One table's records for :meth:`mdbench.notebook.Session.record_frame`: the long ``frame`` and the
    per-sample outputs behind it (``samples``, with ``row`` and ``dataset`` columns; None for a seed-level table)."""

    frame: pd.DataFrame
    samples: pd.DataFrame | None


def record(runs: pd.DataFrame, data: dict[str, ClassificationData], cfg: Config, fm_init: str
           ) -> dict[str, TableRecords]:
    """The records of :func:`run`'s rows, per table.

    ``table1``: accuracy and AUC of each (dataset label, row), row ``<method>`` for FM methods and
    ``<method>/<student>`` for student methods, with each seed's test probabilities as classifier outputs
    (:func:`mdbench.samples.classifier_frame`; unit: the test image's id, shared by every row of a dataset).
    ``spread``: each seed's absolute deviation from the seeds' mean accuracy (student rows, more than one seed),
    seed-level only. ``gain``: per seed, RD's accuracy minus that of the best of Hinton KD, FitNet and RKD on that
    seed (when all four ran), computed as the mean over the test images of ``100 * (RD correct - best correct)``,
    the per-image values kept as ``accuracy_gain`` lines.
    """
    base_config = {**cfg.as_record(), "fm_init": fm_init}
    lines: dict[str, list[dict[str, Any]]] = {"table1": [], "spread": [], "gain": []}
    outputs: dict[str, list[pd.DataFrame]] = {"table1": [], "gain": []}

    def add(table: str, row: str, metric: str, values, seeds, dataset: str, name: str, config: dict, unit: str,
            notes: str = ""):
        lines[table] += [{"row": row, "metric": metric, "value": v, "seed": s, "dataset": dataset, "unit": unit,
                          "dataset_checksum": data[name].checksum, "config": config, "notes": notes}
                         for v, s in zip(values, seeds, strict=True)]

    for (label, method, student), group in runs.groupby(["dataset", "method", "student"], sort=False):
        group = group.sort_values("seed")
        row = method if student == "—" else f"{method}/{student}"
        config = {**base_config, "fraction": float(group.fraction.iloc[0]), "method": method, "student": student,
                  "init": group.init.iloc[0], "kd_teacher": group.kd_teacher.iloc[0]}
        name = group.name.iloc[0]
        test = data[name].test
        for metric in ("accuracy", "auc"):
            add("table1", row, metric, group[metric], group.seed, label, name, config, "%")
        outputs["table1"] += [sample_outputs.classifier_frame(seed, test.ids.tolist(), test.y.numpy(), probs)
                              .assign(row=row, dataset=label)
                              for seed, probs in zip(group.seed, group.probs, strict=True)]
        if student != "—" and len(group) > 1:
            deviation = (group.accuracy - group.accuracy.mean()).abs()
            add("spread", row, "accuracy_abs_dev", deviation, group.seed, label, name, config, "points")
    if set(KD_BASELINES) <= set(runs.method) and "rd" in set(runs.method):
        for (name, fraction, student), group in runs[runs.student != "—"].groupby(["name", "fraction", "student"]):
            row = f"rd_gain_{'full' if fraction == 1 else f'{round(100 * fraction)}pct'}/{student}"
            gains, best = _per_image_gains(group, data[name].test)
            outputs["gain"] += [frame.assign(row=row, dataset=name) for frame in gains]
            means = [float(frame.value.mean()) for frame in gains]
            add("gain", row, "accuracy_gain", means, [int(f.seed.iloc[0]) for f in gains], name, name,
                {**base_config, "fraction": fraction, "student": student}, "points",
                notes="best KD baseline: " + ", ".join(f"seed {s} {m}" for s, m in best.items()))
    return {table: TableRecords(pd.DataFrame(rows), pd.concat(outputs[table]) if outputs.get(table) else None)
            for table, rows in lines.items() if rows}


def _per_image_gains(group: pd.DataFrame, test: Split) -> tuple[list[pd.DataFrame], dict[int, str]]:
    """Per seed of one (dataset, fraction, student) of :func:`run`'s rows: lines ``seed, unit, metric, value`` of
    ``100 * (RD correct - best baseline correct)`` per test image, the best baseline being the one of
    :data:`KD_BASELINES` with the highest accuracy on that seed (the first of them on a tie); and ``{seed: best}``."""
    frames, best = [], {}
    for seed, by_seed in group.groupby("seed"):
        runs_of = by_seed.set_index("method")
        best[int(seed)] = baseline = str(runs_of.accuracy[list(KD_BASELINES)].idxmax())
        rd_correct, baseline_correct = (runs_of.probs[m].argmax(axis=1) == test.y.numpy() for m in ("rd", baseline))
        frames.append(pd.DataFrame({"seed": int(seed), "unit": test.ids.astype(str), "metric": "accuracy_gain",
                                    "value": 100.0 * (rd_correct.astype(float) - baseline_correct)}))
    return frames, best


# ------------------------------------------------------------------------------------------------- Table 2
def deployment_costs(students: list[str], image_size: int, num_classes: int, embed_dim: int, fm_names: list[str],
                     latency_repeats: int = 10) -> pd.DataFrame:
    """Deployed parameters, FLOPs and CPU latency (batch 1) of each FM with a linear head and each student, every
    model at the same input size.

    Like for like: a model's FLOPs and latency grow with the pixels it reads, so a student timed at the run's
    16-32 px against the FM at its 256 px would owe most of its advantage to the resolution. Every model is
    measured at one side: the native side of an FM of ``fm_names`` that takes one size only (LiteMedSAM's encoder,
    256, to which it resizes any input), else ``image_size`` (the run's resolution). Parameter counts do not depend
    on it (but for a ViT student's position embedding, built for that side). A student deploys ``g(h(F_s(x)))``;
    an FM deploys itself and a linear head (linear probe, full FT; LoRA and VPT add to it). ``embed_dim``: the
    students' projector width (the run's FM feature width).

    Every model is timed in the same rounds (:func:`mdbench.efficiency.measure_latencies`), so that repeat r of
    two models is a pair.

    Returns:
        One row per model: ``model``, ``kind`` (fm / student), ``params`` (deployed), ``flops``, ``latency_ms``
        (median), ``latency_p90_ms``, ``latency_times_ms`` (each repeat's), ``threads``, ``input_shape`` (the same
        for every row).
    """
    encoders = {name: build_fm(name, None) for name in fm_names}
    native = {encoder.input_size for encoder in encoders.values() if encoder.input_size is not None}
    if len(native) > 1:
        raise ValueError(f"the FMs {fm_names} take different fixed input sizes {sorted(native)}: Table 2 compares "
                         "every model at one size")
    size = native.pop() if native else image_size
    models: dict[str, tuple[str, nn.Module]] = {
        name: ("fm", FMClassifier(encoder, encoder.feature_dim, num_classes)) for name, encoder in encoders.items()}
    for name in students:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # build_model returns nn.Module: the registry's "projected_student" builds a ProjectedStudent
            student = cast(ProjectedStudent, build_model("projected_student", backbone=name, embed_dim=embed_dim,
                                                         image_size=size, pretrained=False))
        models[name] = ("student", DeployedStudent(student, nn.Linear(student.embed_dim, num_classes)))
    kinds = {name: kind for name, (kind, _) in models.items()}
    costs = efficiency.deployment_costs({name: model for name, (_, model) in models.items()},
                                        torch.rand(1, 3, size, size), latency_repeats)
    return pd.DataFrame([{"model": c["model"], "kind": kinds[c["model"]], **c} for c in costs])


def record_costs(costs: pd.DataFrame, num_classes: int, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 2's records (``params_m``, ``gflops``, ``latency_ms`` of each model) of :func:`deployment_costs`;
    config and notes state the input every model was measured at and the resolution the students trained at. With
    them, the per-sample outputs of ``latency_ms`` (the median of its repeats): one line per repeat (``row, seed,
    unit, metric, value``, unit ``rep00``, ``rep01``, … shared by the models timed in one round), for
    ``record_frame(..., aggregate="median")``."""
    def config_of(cost) -> dict[str, Any]:
        return {"model": cost.model, "input_shape": cost.input_shape, "same_input_for_every_model": True,
                "trained_image_size": cfg.image_size, "num_classes": num_classes, "threads": cost.threads,
                "latency_repeats": cfg.latency_repeats}

    def notes_of(cost) -> str:
        return (f"input {cost.input_shape} for every model of the table (students trained at {cfg.image_size} px), "
                f"CPU, {cost.threads} threads")

    return efficiency.cost_records(costs.itertuples(), config_of, notes_of, dataset="deployment")


# ------------------------------------------------------------------------------------------------- training curves
def convergence(runs: pd.DataFrame, at: tuple[float, ...] = (0.5, 0.75, 1.0)) -> pd.DataFrame:
    """Whether the training budget sufficed: per (dataset label, student, method) of :func:`run`'s rows, the mean
    over seeds of the training cross-entropy (:func:`training_curve`) at the end of the first epoch that reaches
    each fraction ``at`` of the run's steps, one column per fraction. A loss still falling between the last two
    columns has not flattened."""
    trained = runs[runs.curve.notna()]

    def at_fraction(curve: np.ndarray, q: float) -> float:
        return float(curve[np.searchsorted(curve[:, 0], q * curve[-1, 0]), 1])

    lines = [{"dataset": r.dataset, "student": r.student, "method": r.method, "steps": r.steps,
              **{f"ce at {round(100 * q)}%": at_fraction(r.curve, q) for q in at}} for r in trained.itertuples()]
    return pd.DataFrame(lines).groupby(["dataset", "student", "method"], sort=False).mean()


@figures.styled
def plot_curves(runs: pd.DataFrame, student: str):
    """One panel per dataset label: each method's training cross-entropy against optimizer steps for ``student``
    (FM methods too), mean over seeds; log scale where the losses span a decade or more. Returns the figure."""
    import matplotlib.pyplot as plt

    names = figures.method_names("rd")
    rows = runs[runs.curve.notna() & runs.student.isin([student, "—"])]
    labels = list(dict.fromkeys(rows.dataset))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for method, group in rows[rows.dataset == label].groupby("method", sort=False):
            curve = np.mean(np.stack(list(group.curve)), axis=0)  # every seed of a row takes the same steps
            ax.plot(curve[:, 0], curve[:, 1], label=figures.human(names, str(method)))
        figures.set_scale(ax, "y", [y for line in ax.get_lines() for y in line.get_ydata()])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0, 0].set_ylabel(f"training cross-entropy ({figures.human(names, student)})")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------- figures
def record_figures(store) -> dict:
    """The figures that ``store``'s records alone make (``mdbench figures``, no retraining):
    ``accuracy_vs_flops_and_seed_spread`` (:func:`plot_accuracy` on Table 1's per-seed accuracies and Table 2's
    costs); none without both tables."""
    records = store.records()
    accuracy = [r for r in records if r.table == "table1" and r.metric == "accuracy"]
    costs = {}
    for r in records:
        if r.table == "table2" and r.metric == "gflops":
            costs[r.row] = {"model": r.row, "flops": r.mean * 1e9, "input_shape": r.config["input_shape"]}
    if not accuracy or not costs:
        return {}
    runs = pd.DataFrame([{"dataset": r.dataset, "method": r.row.split("/")[0], "student": r.config["student"],
                          "seed": seed, "accuracy": value}
                         for r in accuracy for seed, value in zip(r.seeds, r.values, strict=True)])
    fm = accuracy[0].config["fm"]
    return {"accuracy_vs_flops_and_seed_spread": plot_accuracy(runs, pd.DataFrame(list(costs.values())), fm)}


@figures.styled
def plot_accuracy(runs: pd.DataFrame, costs: pd.DataFrame, fm: str):
    """Left: mean accuracy over seeds against the deployed model's FLOPs of :func:`deployment_costs`, every model
    at the same input size: students at their cost, FM methods and RD's reprogrammed-FM path at the cost of ``fm``,
    the FM they ran. Where ``fm`` is a stand-in (paper.yaml's ``pareto.stand_ins``) those rows are left out, since
    their accuracy is not the real FM's, and the title says so. Methods by human name. Right: every seed's accuracy
    per method. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from mdbench import pareto

    spec = pareto.load_spec("rd")
    stand_ins = spec.stand_ins if spec is not None else ()
    names = figures.method_names("rd")
    flops = dict(zip(costs.model, costs.flops / 1e9, strict=True))
    means = runs.groupby(["dataset", "method", "student"], as_index=False).accuracy.mean()
    means["deployed"] = np.where(means.student == "—", fm, means.student)
    means.loc[means.method == "rd_teacher", "deployed"] = fm
    left_out = sorted(set(means.method[means.deployed.isin(stand_ins)]))
    means = means[~means.deployed.isin(stand_ins)].assign(
        GFLOPs=lambda f: f.deployed.map(flops),
        method=lambda f: [figures.human(names, m if s == "—" else f"{m}/{s}") for m, s in zip(f.method, f.student,
                                                                                           strict=True)])
    fig, (ax_cost, ax_seed) = plt.subplots(1, 2, figsize=(13, 5.5))
    sns.scatterplot(data=means, x="GFLOPs", y="accuracy", hue="method", style="dataset", s=60, ax=ax_cost)
    figures.set_scale(ax_cost, "x", means.GFLOPs)
    title = f"accuracy vs deployed FLOPs at input {costs.input_shape.iloc[0]} (mean over seeds)"
    if left_out:
        title += (f"\nleft out: {', '.join(figures.human(names, m) for m in left_out)}:\nthey ran on "
                  f"{figures.human(names, fm)}, a stand-in whose accuracy is not the real FM's")
    ax_cost.set_title(title, fontsize=8)
    ax_cost.set_ylabel("accuracy (%)")
    ax_cost.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    order = [m for m in FM_METHODS + STUDENT_METHODS + ("rd_teacher",) if m in set(runs.method)]
    sns.stripplot(data=runs.assign(method=runs.method.map(lambda m: figures.human(names, m))), x="method",
                  y="accuracy", hue="dataset", order=[figures.human(names, m) for m in order], dodge=True, ax=ax_seed)
    ax_seed.tick_params(axis="x", rotation=60)
    ax_seed.set_xlabel("")
    ax_seed.set_ylabel("accuracy (%)")
    ax_seed.set_title("accuracy of each seed")
    ax_seed.legend(fontsize=6, title="dataset", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig

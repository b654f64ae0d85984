"""Med-Tuning experiment glue: volumes as tensors, each method's model, training, scores and costs.

Every method shares the slice-wise model (``build_model("slicewise_segmenter")``: one backbone, one UPerNet
decoder) and differs only in what is trained (:func:`mdbench.tuning.apply_method`), except the reference 3D network
trained from scratch (``build_model("unet3d")``, MONAI's ``UNet``). All are trained with the paper's recipe at
reduced scale: softmax soft-Dice summed over the foreground classes (MONAI ``DiceLoss``), Adam with amsgrad and weight
decay 1e-5, the official warm-up + cosine learning-rate shape; no augmentation, no sliding window, no test-time
flips.

Two protocols (:func:`cv_folds`): the data's fixed train/test split (``Config.folds`` None), or a k-fold
cross-validation over the volumes, one repeat per seed, in which every volume is scored once per seed by the model of
the fold that held it out. Volumes are resampled to T × S × S, or zero-padded to it at their own voxels
(``Config.resize``); the training batches are indexed out of tensors that stay on the training device.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
from monai.losses import DiceLoss
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from mdbench import efficiency, figures, metrics, train
from mdbench.data.base import RealDataset
from mdbench.data.registry import get_spec, is_present, load_dataset
from mdbench.data.splits import kfold_splits
from mdbench.data.synthetic import SyntheticVolumes
from mdbench.efficiency import peak_memory
from mdbench.models import build_model
from mdbench.models.slicewise import MedAdapterConfig
from mdbench.params import NotebookConfig
from mdbench.repro import seed_rngs
from mdbench.tuning import apply_method, trainable_report
from mdbench.work import Work, uncached

CLASSES = ("background", "anterior", "posterior")
TABLE1_ROWS = ("scratch_unet3d", "full", "head", "lora", "vpt", "adaptformer", "med_tuning")
PET_ROWS = ("head", "lora", "vpt", "adaptformer")
ABLATION_SWITCHES = {"no_3x3": {"branch3": False}, "no_5x5": {"branch5": False}, "no_fft": {"fft": False},
                     "no_inter_fi": {"inter_fi": False}}

RESIZE = ("resample", "pad")

__all__ = ["ABLATION_SWITCHES", "CLASSES", "CURVE_TABLES", "FAILED_BELOW", "PER_VOLUME", "PET_ROWS", "RESIZE",
           "TABLE1_ROWS", "Config", "FoldRun", "RowResult", "Volumes", "ablation_adapters", "build_row_model",
           "class_dice_by_run", "curves_figure", "cv_folds", "dice_loss", "draw_framework", "evaluate",
           "failed_runs", "load_data", "load_volumes", "mean_curves", "per_volume_lines", "plot_curves",
           "plot_dice_vs_params", "plot_memory", "plot_slices", "protocol", "record", "record_figures", "run",
           "run_config", "run_fold", "summary_frame", "training_memory_mb", "volume_means", "wide_table"]


LATENCY_REPEATS = 10  # timed rounds of every row's deployed model (their median is the record)


@dataclass(frozen=True)
class Config(NotebookConfig):
    """The notebook's parameters: everything that decides a run's numbers (recorded as each record's config).
    The deterministic mode is the session's (:func:`mdbench.notebook.start`)."""

    selectors: ClassVar[tuple[str, ...]] = ("seeds", "ablation_seeds", "ablation_ratios")  # name the units (row, seed)
    later_fields: ClassVar[tuple[str, ...]] = ("folds", "n_volumes", "resize", "latency_repeats")

    dataset: str = "msd_hippocampus"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0,)
    ablation_ratios: tuple[float, ...] = ()
    n_train: int | None = None
    n_test: int | None = None
    backbone: str = "litemedsam"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: bool = True
    image_size: int = 32
    num_slices: int = 16
    decoder_channels: int = 64
    adapter_ratio: float = 6
    epochs: int = 10
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    lora_r: int = 8
    vpt_prompts: int = 8
    adaptformer_bottleneck: int = 16
    unet_channels: tuple[int, ...] = (16, 32, 64, 128)
    device: str = "cpu"
    amp: bool = False
    folds: int | None = None       # k of a k-fold cross-validation over the volumes; None: the fixed train/test split
    n_volumes: int | None = None   # with folds: the first n volumes of the dataset (None: all of them)
    resize: str = "resample"       # resample | pad: zero-padded to T × S × S at the data's own voxels
    latency_repeats: int = LATENCY_REPEATS  # timed rounds of the deployment table (the record: their median)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE:
            raise ValueError(f"resize must be one of {RESIZE}, got {self.resize!r}")
        if self.folds is None:
            if self.n_volumes is not None:
                raise ValueError("n_volumes sizes the cross-validation: set folds, or n_train / n_test for the fixed "
                                 "split")
        elif self.folds < 2 or self.n_train is not None or self.n_test is not None:
            raise ValueError(f"a {self.folds}-fold cross-validation needs folds >= 2 and tests every volume once: "
                             f"size it with n_volumes, not n_train ({self.n_train}) / n_test ({self.n_test})")

    @property
    def warmup_epochs(self) -> int:
        """The official recipe warms up for a tenth of the epochs (at least one)."""
        return max(1, self.epochs // 10)

    def as_record(self) -> dict[str, Any]:
        """The base record (the fields that came with cross-validation, padding and the deployment table only where
        set: :attr:`later_fields`), and ``warmup_epochs``."""
        return {**super().as_record(), "warmup_epochs": self.warmup_epochs}


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class Volumes:
    """The run's volumes as tensors: ``images`` (N, 1, T, S, S) in [0, 1], ``labels`` (N, T, S, S) int64,
    ``spacing`` (N, 3) mm of the returned voxels, ``extent`` (N, 3) int: the corner ``[:d, :h, :w]`` of the grid that
    holds each volume (the rest is zero padding; the whole grid when resampled), ``ids``, ``split`` (N,): each
    volume's part of the fixed split (``"train"`` / ``"test"``), or ``"all"`` for a cross-validation's volumes;
    ``dataset`` and ``checksum`` name the data for records."""

    images: torch.Tensor
    labels: torch.Tensor
    spacing: np.ndarray
    extent: np.ndarray
    ids: list[str]
    split: np.ndarray
    dataset: str
    checksum: str

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Iterable[int]) -> Volumes:
        """The volumes at positions ``index``, in that order (tensors indexed where they are)."""
        index = np.asarray(list(index), dtype=np.int64)
        at = torch.from_numpy(index).to(self.images.device)
        return Volumes(self.images[at], self.labels[at], self.spacing[index], self.extent[index],
                       [self.ids[i] for i in index], self.split[index], self.dataset, self.checksum)

    def parts(self) -> dict[str, Volumes]:
        """Each part of the split (``"train"``, ``"test"`` or ``"all"``) as its own volumes, in order of appearance."""
        return {name: self.subset(np.flatnonzero(self.split == name)) for name in dict.fromkeys(self.split.tolist())}

    def to(self, device: str | torch.device) -> Volumes:
        """The same volumes with images and labels on ``device`` (130 padded MSD volumes take about 0.3 GB)."""
        return Volumes(self.images.to(device), self.labels.to(device), self.spacing, self.extent, self.ids,
                       self.split, self.dataset, self.checksum)

    @staticmethod
    def concat(parts: Iterable[Volumes]) -> Volumes:
        """Volumes of one dataset, one part after another; the checksum names every part's data."""
        parts = list(parts)
        if len({p.dataset for p in parts}) != 1:
            raise ValueError(f"cannot pool volumes of datasets {sorted({p.dataset for p in parts})}")
        sums = list(dict.fromkeys(p.checksum for p in parts))  # real data: one checksum for every split
        checksum = sums[0] if len(sums) == 1 else hashlib.sha256("+".join(sums).encode()).hexdigest()
        return Volumes(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                       np.concatenate([p.spacing for p in parts]), np.concatenate([p.extent for p in parts]),
                       [i for p in parts for i in p.ids], np.concatenate([p.split for p in parts]),
                       parts[0].dataset, checksum)


def load_data(cfg: Config) -> Volumes:
    """Every volume of the run: the fixed split's ``cfg.n_train`` training and ``cfg.n_test`` test volumes (in that
    order), or with ``cfg.folds`` the first ``cfg.n_volumes`` of the whole dataset (:func:`cv_folds` cuts them)."""
    if cfg.dataset != "synthetic":
        check_classes(cfg.dataset)
        if not is_present(cfg.dataset, cfg.data_dir):
            raise FileNotFoundError(f"{cfg.dataset} is not under {cfg.data_dir or '$MDBENCH_DATA_DIR'}: see "
                                    f"data_cards/{cfg.dataset}.md, or run the smoke profile on synthetic volumes")
    if cfg.folds is not None:
        return load_volumes(cfg.dataset, "all", cfg.n_volumes, cfg, cfg.data_dir)
    return Volumes.concat([load_volumes(cfg.dataset, "train", cfg.n_train, cfg, cfg.data_dir),
                           load_volumes(cfg.dataset, "test", cfg.n_test, cfg, cfg.data_dir)])


def check_classes(dataset: str) -> None:
    """Refuse a dataset whose labels are not the hippocampus' (background, anterior, posterior): the rows, their
    per-class Dice records and the claims name those two structures. A registered Decathlon dataset
    (``mdbench data register``) with other labels is an error saying so."""
    classes = tuple(get_spec(dataset).classes)
    if classes != CLASSES:
        raise ValueError(f"dataset {dataset!r} has the labels {list(classes)}, and the Med-Tuning notebook segments "
                         f"the hippocampus' {list(CLASSES)} (its per-class Dice and claims name them): use a "
                         "Decathlon-layout dataset whose dataset.json labels are 0 background, 1 anterior, "
                         "2 posterior")


def load_volumes(dataset: str, split: str, n: int | None, cfg: Config, data_dir: str | None = None) -> Volumes:
    """The first ``n`` volumes (all with None) of ``split``, brought to (T, S, S) = (num_slices, image_size,
    image_size) as ``cfg.resize`` says.

    ``dataset``: ``"synthetic"`` (:class:`SyntheticVolumes`, generated at that shape; its ``"all"`` is its training
    stream, the volumes being drawn independently) or ``"msd_hippocampus"`` (``resample``: MONAI ``Resize``,
    trilinear image, nearest label; ``pad``: zeros after each axis' end, the voxels left as they are, 1 mm).
    Intensities are min-max scaled per volume to [0, 1], the input range of LiteMedSAM. The slice axis T is the
    volume's first axis (left-right in the RAS MSD volumes).
    """
    shape = (cfg.num_slices, cfg.image_size, cfg.image_size)
    source: SyntheticVolumes | RealDataset
    if dataset == "synthetic":
        source = SyntheticVolumes(n or 1, shape=shape, seed=0, split="train" if split == "all" else split,
                                  normalize="minmax")
    else:
        # the registry types its result as Dataset; every real dataset's loader is a RealDataset (len, checksum)
        source = cast(RealDataset, load_dataset(dataset, split=split, data_dir=data_dir, normalize="minmax",
                                                spatial_size=shape, resize=cfg.resize))
    count = len(source) if n is None else min(n, len(source))
    if count == 0:
        raise ValueError(f"{dataset} split {split!r} has no volumes")
    items = [source[i] for i in range(count)]
    return Volumes(images=torch.stack([it["image"] for it in items]).float(),
                   labels=torch.stack([it["label"] for it in items]).long(),
                   spacing=np.array([it["spacing"] for it in items], dtype=np.float64),
                   extent=np.array([it.get("extent", shape) for it in items], dtype=np.int64),
                   ids=[it["id"] for it in items], split=np.full(count, split), dataset=dataset,
                   checksum=source.checksum)


def run_config(cfg: Config, volumes: Volumes) -> dict[str, Any]:
    """The config a run's records keep: ``cfg.as_record()`` with the numbers of volumes it ran on (``n_train`` and
    ``n_test`` of the fixed split, or ``n_volumes`` of the cross-validation)."""
    if cfg.folds is None:
        counts = {name: int((volumes.split == part).sum()) for name, part in (("n_train", "train"), ("n_test", "test"))}
    else:
        counts = {"n_volumes": len(volumes)}
    return {**cfg.as_record(), **counts}


def cv_folds(volumes: Volumes, folds: int | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` positions into ``volumes`` of each fold of one seed: the fixed split as one fold (the same
    for every seed), or a ``folds``-fold cross-validation shuffled by ``seed`` (:func:`mdbench.data.splits.
    kfold_splits` over one stratum), whose test parts partition the volumes."""
    if folds is None:
        return [(np.flatnonzero(volumes.split == "train"), np.flatnonzero(volumes.split == "test"))]
    if folds > len(volumes):
        raise ValueError(f"a {folds}-fold cross-validation needs at least {folds} volumes, got {len(volumes)}")
    return kfold_splits(np.zeros(len(volumes), dtype=np.int64), folds, seed)


# ---------------------------------------------------------------------------------------------------- models
def ablation_adapters(ratios: Iterable[float] = (), base_ratio: float = 6) -> dict[str, MedAdapterConfig]:
    """Table 2 rows: the full Med-Adapter, each branch switched off, and other reduction ratios."""
    rows = {"med_tuning": MedAdapterConfig(ratio=base_ratio)}
    rows.update({name: MedAdapterConfig(ratio=base_ratio, **switch) for name, switch in ABLATION_SWITCHES.items()})
    rows.update({f"r={r:g}": MedAdapterConfig(ratio=r) for r in ratios if r != base_ratio})
    return rows


def build_row_model(row: str, cfg: Config, adapter: MedAdapterConfig | None = None) -> nn.Module:
    """The model of one table row, with its trainable set: ``scratch_unet3d``, ``full``, ``head``, ``lora``,
    ``vpt``, ``adaptformer``, or Med-Tuning (any other row name, with ``adapter``; default the full Med-Adapter)."""
    num_classes = len(CLASSES)
    if row == "scratch_unet3d":
        return build_model("unet3d", in_channels=1, out_channels=num_classes, channels=cfg.unet_channels)
    methods: dict[str, dict[str, Any]] = {"full": {}, "head": {}, "lora": {"r": cfg.lora_r}, "vpt": {"num_prompts": cfg.vpt_prompts},
               "adaptformer": {"bottleneck": cfg.adaptformer_bottleneck}}
    if row not in methods and adapter is None:
        adapter = MedAdapterConfig(ratio=cfg.adapter_ratio)
    model = build_model("slicewise_segmenter", backbone=cfg.backbone, image_size=cfg.image_size,
                        num_classes=num_classes, num_slices=cfg.num_slices, decoder_channels=cfg.decoder_channels,
                        adapter=None if row in methods else adapter, pretrained=cfg.pretrained,
                        **cfg.backbone_kwargs)
    return apply_method(model, row if row in methods else "head", **methods.get(row, {}))


def deployment_costs(cfg: Config, rows: Iterable[str]) -> pd.DataFrame:
    """What each row deploys, on one volume (1, 1, T, S, S) of the run's size on the CPU: every parameter of the
    model (the frozen backbone too, which a deployment carries; LoRA unmerged), its forward FLOPs and its latency,
    all rows timed in the same ``cfg.latency_repeats`` rounds (:func:`mdbench.efficiency.deployment_costs`, whose
    columns it returns)."""
    models = {row: build_row_model(row, cfg).eval() for row in rows}
    volume = torch.rand(1, 1, cfg.num_slices, cfg.image_size, cfg.image_size)
    return pd.DataFrame(efficiency.deployment_costs(models, volume, cfg.latency_repeats))


def record_costs(costs: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``deployment`` table's records of :func:`deployment_costs` (``params_m``, ``gflops``, ``latency_ms`` per
    row, dataset "deployment") and the latency repeats behind them (:func:`mdbench.efficiency.cost_records`)."""
    def config_of(cost) -> dict[str, Any]:
        return {"row": cost.model, "backbone": cfg.backbone, "input_shape": cost.input_shape,
                "threads": cost.threads, "latency_repeats": len(cost.latency_times_ms)}

    def notes_of(cost) -> str:
        return f"one volume {cost.input_shape} through the deployed model, CPU, {cost.threads} threads"

    return efficiency.cost_records(costs.itertuples(), config_of, notes_of, dataset="deployment")


# ----------------------------------------------------------------------------------------------- train, score
def dice_loss() -> DiceLoss:
    """The paper's loss: ``sum_c (1 - 2 sum p_c g_c / (sum p_c + sum g_c + 1e-5))`` over the foreground classes,
    softmax probabilities, sums over the whole batch (MONAI ``DiceLoss(batch=True, reduction="sum")``)."""
    return DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, reduction="sum",
                    smooth_nr=0.0, smooth_dr=1e-5)


def _paper_schedule(optimizer: torch.optim.Optimizer, epochs: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Official shape: ``1 - cos(pi/2 (e+1)/warmup)`` during warm-up, then ``(cos(pi (e-warmup)/epochs) + 1) / 2``."""
    def factor(epoch: int) -> float:
        if epoch < warmup:
            return 1 - math.cos(math.pi / 2 * (epoch + 1) / warmup)
        return (math.cos(math.pi * (epoch - warmup) / epochs) + 1) / 2

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             generator: torch.Generator | None = None) -> DataLoader:
    """Batches ``(images[idx], labels[idx])`` indexed out of the tensors where they lie (the GPU in training): one
    indexing per batch, no per-volume item or collation. With ``generator`` the order is shuffled every pass,
    drawing from it as ``DataLoader(shuffle=True, generator=generator)`` does, so that a run gives the batches the
    per-volume loader gave."""
    volumes = range(len(images))
    order = SequentialSampler(volumes) if generator is None else RandomSampler(volumes, generator=generator)
    return DataLoader(TensorDataset(images, labels), sampler=BatchSampler(order, batch_size, drop_last=False),
                      batch_size=None, generator=generator)


def _step(loss_fn: nn.Module):
    def step(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return loss_fn(model(x), y.unsqueeze(1)), {}
    return step


def training_memory_mb(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                       optimizer: torch.optim.Optimizer, device: str, amp: bool = False) -> tuple[float, str]:
    """Memory of one training step of a trained model (its optimizer state already allocated), in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` during forward + backward (weights, optimizer state, gradients,
    activations; bf16 autocast with ``amp``, as in training). CPU, where no allocator peak exists: counted, not
    sampled: parameters + gradients of the trainable ones + optimizer state + the tensors autograd saves for
    backward (each storage once, parameters excluded). Returns ``(mib, method)``.
    """
    model.train()
    x, y = (t.to(device) for t in batch)
    loss_fn = dice_loss()
    if torch.device(device).type == "cuda":
        def fwd_bwd() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x), y.unsqueeze(1))
            loss.backward()
        report = peak_memory(fwd_bwd, device)
        model.zero_grad(set_to_none=True)
        return report.peak_bytes / 2**20, report.method
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y.unsqueeze(1))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return (params + grads + state + sum(saved.values())) / 2**20, "counted: params+grads+optimizer+saved tensors"


def _inside(extent: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, T, S, S) bool: True on each volume's own voxels, the corner ``[:d, :h, :w]`` of ``extent`` (N, 3)."""
    axes = [torch.arange(n) for n in shape]
    ends = torch.from_numpy(np.asarray(extent, dtype=np.int64))
    return ((axes[0][None, :, None, None] < ends[:, 0, None, None, None])
            & (axes[1][None, None, :, None] < ends[:, 1, None, None, None])
            & (axes[2][None, None, None, :] < ends[:, 2, None, None, None]))


def evaluate(model: nn.Module, volumes: Volumes, device: str, batch_size: int = 2) -> dict[str, Any]:
    """Scores on ``volumes``: Dice (%) per foreground class and over both, HD95 (mm) over both classes, predictions,
    and the per-volume values each score is the mean of (``per_volume``, :func:`per_volume_lines`). A score over
    both classes is the mean over every scored (volume, class) pair: the mean of the two classes' scores when every
    volume scores both (every test volume of MSD Hippocampus has both).

    Only each volume's own voxels are scored (its ``extent``): a prediction in the zero padding around it counts as
    background. Per-case values follow :mod:`mdbench.metrics` (a class absent from both is skipped). A class the
    target has and the prediction misses gets HD95 = the volume's diagonal in mm (a worst-case distance, as BraTS
    scores an empty prediction), so a model that finds nothing is not rewarded by an undefined distance.
    """
    loader = _batches(volumes.images, volumes.labels, batch_size)
    pred, target = train.predict(model, loader, device, fn=lambda m, b: (m(b[0]).argmax(dim=1).byte(), b[1]))
    pred = pred * _inside(volumes.extent, tuple(pred.shape[1:]))
    dice = metrics.dice_per_class(pred, target, len(CLASSES)).numpy()  # (N, 2)
    hd = []
    for case in range(len(volumes)):
        spacing = volumes.spacing[case]
        # on the volume's own voxels: the padding is background in both, so its surfaces and distances are the same
        own = (slice(case, case + 1), *(slice(0, int(n)) for n in volumes.extent[case]))
        h = metrics.hd95(pred[own], target[own], len(CLASSES), spacing=spacing.tolist())[0]
        present = torch.tensor([(target[case] == c).any().item() for c in range(1, len(CLASSES))])
        diagonal = float(np.linalg.norm(volumes.extent[case] * spacing))
        hd.append(torch.where(torch.isnan(h) & present, torch.full_like(h, diagonal), h).numpy())
    lines = per_volume_lines(volumes.ids, 100 * dice, np.array(hd))
    return {**volume_means(lines), "pred": pred, "per_volume": lines}


PER_VOLUME = ("dice_anterior", "dice_posterior", "dice_mean", "hd95")


def per_volume_lines(ids: list[str], dice: np.ndarray, hd: np.ndarray) -> pd.DataFrame:
    """Each volume's scores as lines ``unit, metric, value, weight`` (:mod:`mdbench.samples`, unit = volume id).

    ``dice`` (%) and ``hd`` (mm): (N, 2) per volume and foreground class, ``nan`` where a class is not scored
    (:mod:`mdbench.metrics`). ``dice_anterior`` / ``dice_posterior``: the class's value, weight 1; ``dice_mean`` and
    ``hd95``: the mean over the volume's scored classes, weight = how many were scored, so that the weighted mean
    over volumes is the mean over every scored (volume, class) pair. A volume with nothing scored has no line.
    """
    dice, hd = np.asarray(dice, dtype=np.float64), np.asarray(hd, dtype=np.float64)  # written back exactly
    per_class = {"dice_anterior": dice[:, :1], "dice_posterior": dice[:, 1:], "dice_mean": dice, "hd95": hd}
    frames = []
    for metric, scores in per_class.items():
        scored = (~np.isnan(scores)).sum(axis=1)
        keep = scored > 0
        frames.append(pd.DataFrame({"unit": np.asarray(ids)[keep], "metric": metric,
                                    "value": np.nanmean(scores[keep], axis=1), "weight": scored[keep]}))
    return pd.concat(frames, ignore_index=True)


def volume_means(lines: pd.DataFrame) -> dict[str, float]:
    """The weighted mean over volumes of each metric of :data:`PER_VOLUME` (``nan`` for one without lines)."""
    means = {metric: float(np.average(own["value"], weights=own["weight"]))
             for metric, own in lines.groupby("metric")}
    return {metric: means.get(metric, math.nan) for metric in PER_VOLUME}


FAILED_BELOW = 10.0  # % mean Dice of a class over a run's test volumes: far under every run that learned the class


def class_dice_by_run(per_volume: pd.DataFrame) -> pd.DataFrame:
    """Each run's mean Dice (%) of each foreground class over its test volumes: one line per ``row, seed, fold``
    (the index), a column per class (``dice_anterior``, ``dice_posterior``; ``nan`` where no test volume has it).

    ``per_volume``: lines ``row, seed, fold, metric, value`` (:attr:`RowResult.per_volume`), of one row or several.
    """
    missing = {"row", "seed", "fold", "metric", "value"} - set(per_volume.columns)
    if missing:
        raise ValueError(f"per-volume lines lack the columns {sorted(missing)}: pass RowResult.per_volume")
    classes = [f"dice_{name}" for name in CLASSES[1:]]
    lines = per_volume[per_volume["metric"].isin(classes)]
    by_run = lines.pivot_table(index=["row", "seed", "fold"], columns="metric", values="value", aggfunc="mean")
    return by_run.reindex(columns=classes).rename_axis(columns=None)


def failed_runs(by_run: pd.DataFrame, below: float = FAILED_BELOW) -> pd.DataFrame:
    """The lines of :func:`class_dice_by_run` with a class under ``below`` % mean Dice: runs that did not learn it.

    The paper's loss (:func:`dice_loss`) is soft Dice alone: once a class's softmax probability saturates near 0
    everywhere its gradient vanishes with the softmax's slope, and the run may never predict that class (Dice 0 on
    every volume); a baseline far from convergence also lands here. A row mean or a paired difference that contains
    such a run measures the failure, not the method.
    """
    return by_run[(by_run < below).any(axis=1)]


@dataclass
class RowResult:
    """Per-seed metrics of one row (``values[metric]`` is a list over ``seeds``), the per-volume values behind the
    scores (``per_volume``: lines ``row, seed, fold, unit, metric, value, weight`` of :func:`per_volume_lines`, the
    ``samples`` of :meth:`mdbench.notebook.Session.record_frame`), each training run's curve (``curves``: lines
    ``row, seed, fold, epoch, train_loss, lr, seconds`` from :class:`mdbench.train.History`), one example prediction
    (seed ``seeds[0]``, the first test volume of its first fold, at position ``example_index`` of the run's
    volumes), where the weights came from, how memory was measured and the protocol in words."""

    row: str
    seeds: list[int]
    values: dict[str, list[float]]
    per_volume: pd.DataFrame
    curves: pd.DataFrame
    example_pred: torch.Tensor | None  # None only for a row run over no seeds
    example_index: int
    init: str
    memory_method: str
    protocol: str

    def subset(self, seeds: Iterable[int]) -> RowResult:
        """The same row restricted to ``seeds`` (all of them among ``self.seeds``)."""
        seeds = list(seeds)
        missing = sorted(set(seeds) - set(self.seeds))
        if missing:
            raise ValueError(f"row {self.row!r} has no run for seeds {missing} (it has {self.seeds})")
        keep = [self.seeds.index(s) for s in seeds]
        values = {k: [v[i] for i in keep] for k, v in self.values.items()}
        return RowResult(self.row, seeds, values, self.per_volume[self.per_volume["seed"].isin(seeds)],
                         self.curves[self.curves["seed"].isin(seeds)], self.example_pred, self.example_index,
                         self.init, self.memory_method, self.protocol)


def protocol(volumes: Volumes, folds: int | None) -> str:
    """The protocol of a run on ``volumes`` in words, for the records' notes."""
    if folds is None:
        return (f"fixed split: trained on {int((volumes.split == 'train').sum())} volumes, scored on "
                f"{int((volumes.split == 'test').sum())}")
    return (f"{folds}-fold cross-validation over {len(volumes)} volumes (one repeat per seed, shuffled by it); each "
            "volume scored once per seed by the fold that held it out")


@dataclass
class FoldRun:
    """One row trained with one seed on one fold's training volumes and scored on its test volumes (a unit of work):
    the per-volume lines (with ``fold``), the training curve (with ``row``, ``seed``, ``fold``), each epoch's seconds,
    the trainable parameters (``trainable`` and ``percent`` of the model), the training memory and how it was
    measured (fold 0 only; nan otherwise), the prediction on the fold's first test volume (T, S, S) and that volume's
    position in the run's volumes, and where the weights came from."""

    per_volume: pd.DataFrame
    curve: pd.DataFrame
    seconds: list[float]
    trainable: int
    percent: float
    memory: float
    memory_method: str
    example_pred: torch.Tensor
    example_index: int
    init: str


def run_fold(row: str, cfg: Config, volumes: Volumes, train_index: np.ndarray, test_index: np.ndarray, seed: int,
             fold: int, adapter: MedAdapterConfig | None = None, progress: bool = False) -> FoldRun:
    """Train one row with one seed on ``volumes[train_index]`` and score it on ``volumes[test_index]``; every fold's
    model starts from the seed's initialisation."""
    seed_rngs(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_row_model(row, cfg, adapter).to(cfg.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, amsgrad=True)
    train_set = volumes.subset(train_index)
    loader = _batches(train_set.images, train_set.labels, cfg.batch_size, generator)
    history = train.fit(model, loader, step_fn=_step(dice_loss()), optimizer=optimizer, epochs=cfg.epochs,
                        scheduler=_paper_schedule(optimizer, cfg.epochs, cfg.warmup_epochs),
                        device=cfg.device, amp=cfg.amp, progress=progress, seed=seed)
    curve = history.to_frame()[["epoch", "train_loss", "lr", "seconds"]].assign(row=row, seed=seed, fold=fold)
    scores = evaluate(model, volumes.subset(test_index), cfg.device, cfg.batch_size)
    memory, memory_method = math.nan, ""
    if fold == 0:
        # after scoring: the measured step runs in train mode and would move BatchNorm statistics
        memory, memory_method = training_memory_mb(model, next(iter(loader)), optimizer, cfg.device, cfg.amp)
    report = trainable_report(model)
    # every model that build_model makes carries its mdbench_init, a str (mdbench.models)
    return FoldRun(scores["per_volume"].assign(fold=fold), curve, [epoch["seconds"] for epoch in history.epochs],
                   report.trainable, report.percent, memory, memory_method, scores["pred"][0], int(test_index[0]),
                   cast(str, model.mdbench_init))


def run(row: str, cfg: Config, volumes: Volumes, seeds: list[int], adapter: MedAdapterConfig | None = None,
        progress: bool = False, work: Work = uncached) -> RowResult:
    """Train and score one row once per seed and fold (:func:`cv_folds`; :func:`run_fold`, each a unit of ``work``
    keyed by row, seed and fold, so a row name must decide its ``adapter``, as in :func:`ablation_adapters`): Table
    1/2 metrics per seed, each over the test volumes of every fold of that seed (all of ``volumes`` under
    cross-validation).

    Metrics: ``dice_anterior``, ``dice_posterior``, ``dice_mean`` (%), ``hd95`` (mm), each the mean of per-volume
    values (kept in ``per_volume``), ``tuned_params_m`` (trainable parameters, millions), ``tuned_params_pct`` (% of
    the row's model), ``train_memory_mb`` (a training step of the seed's first fold), ``s_per_epoch`` (wall seconds
    of one training epoch, mean over the seed's folds). The volumes are moved to ``cfg.device`` once; batches are
    indexed there (:func:`_batches`).
    """
    on_device = volumes.to(cfg.device)
    values: dict[str, list[float]] = {}
    per_volume: list[pd.DataFrame] = []
    curves: list[pd.DataFrame] = []
    first: FoldRun | None = None
    for seed in seeds:
        folds = [work("fold", partial(run_fold, row, cfg, on_device, train_index, test_index, seed, fold, adapter,
                                      progress), row=row, seed=seed, fold=fold)
                 for fold, (train_index, test_index) in enumerate(cv_folds(volumes, cfg.folds, seed))]
        first = first or folds[0]
        lines = pd.concat([f.per_volume for f in folds], ignore_index=True)
        per_volume.append(lines.assign(row=row, seed=seed))
        curves += [f.curve for f in folds]
        seed_values = {**volume_means(lines), "tuned_params_m": folds[0].trainable / 1e6,
                       "tuned_params_pct": folds[0].percent, "train_memory_mb": folds[0].memory,
                       "s_per_epoch": float(np.mean([s for f in folds for s in f.seconds]))}
        for key, value in seed_values.items():
            values.setdefault(key, []).append(value)
    empty = pd.DataFrame(columns=["row", "seed", "fold", "unit", "metric", "value", "weight"])
    return RowResult(row, list(seeds), values, pd.concat(per_volume, ignore_index=True) if per_volume else empty,
                     pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(),
                     first.example_pred if first else None, first.example_index if first else -1,
                     first.init if first else "", first.memory_method if first else "",
                     protocol(volumes, cfg.folds))


# ---------------------------------------------------------------------------------------------------- records
UNITS = {"dice_anterior": "%", "dice_posterior": "%", "dice_mean": "%", "hd95": "mm", "tuned_params_m": "M",
         "tuned_params_pct": "%", "train_memory_mb": "MiB", "s_per_epoch": "s"}
TABLE2_METRICS = ("dice_anterior", "dice_posterior", "dice_mean", "hd95", "tuned_params_m")


def record(result: RowResult, volumes: Volumes, config: dict[str, Any], names: Iterable[str] = tuple(UNITS)
           ) -> pd.DataFrame:
    """The records of one row (``names``: its metrics) as a frame for :meth:`mdbench.notebook.Session.record_frame`:
    one line per (metric, seed). Their per-volume outputs are ``result.per_volume`` (its ``samples``)."""
    notes = f"{result.protocol}; weights: {result.init}; train memory: {result.memory_method}"
    return pd.DataFrame([{"row": result.row, "metric": metric, "seed": seed, "value": value, "unit": UNITS[metric],
                          "notes": notes, "dataset": volumes.dataset, "dataset_checksum": volumes.checksum,
                          "config": config}
                         for metric in names for seed, value in zip(result.seeds, result.values[metric], strict=False)])


def summary_frame(records, table: str) -> pd.DataFrame:
    """Wide view of one table's records: one line per row, ``<metric>`` (mean) and ``<metric>_std`` columns."""
    lines: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.table == table:
            line = lines.setdefault(rec.row, {"row": rec.row, "n": rec.n})
            line[rec.metric], line[f"{rec.metric}_std"] = rec.mean, rec.std
    return pd.DataFrame(list(lines.values()))


def wide_table(records, table: str, names: Iterable[str]) -> pd.DataFrame:
    """One line per row, ``mean ± std`` (2 decimals) of each metric of ``names`` and the number of seeds."""
    frame = summary_frame(records, table).set_index("row")
    cells = {m: frame[m].map("{:.2f}".format) + " ± " + frame[f"{m}_std"].map("{:.2f}".format) for m in names}
    return pd.DataFrame(cells).assign(n=frame["n"])


# ---------------------------------------------------------------------------------------------------- figures
def draw_framework(ax) -> None:
    """Schematic of where the Med-Adapters sit: frozen 2D blocks on every slice, an adapter after each block, the
    inter-stage state carried from stage to stage, and the adapter's branches (for students; not to scale)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    def box(x, y, w, h, text, color, size=8):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="black", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(x0, y0, x1, y1, color="black", style="-|>"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=9, color=color, lw=1))

    frozen, tuned = "#cfe2f3", "#fce5cd"
    box(0.0, 0.05, 1.6, 0.5, "volume (B, 1, T, H, W)\n→ B·T slices", "white")
    rows = (0.85, 1.75, 2.65)
    for s, y in enumerate(rows):
        box(0.0, y, 0.9, 0.5, "block\n(frozen)", frozen)
        box(1.1, y, 0.9, 0.5, "Med-Adapter", tuned)
        box(2.3, y, 0.9, 0.5, "last block\n(frozen)", frozen)
        box(3.4, y, 1.1, 0.5, "Med-Adapter\n+ Inter-FI", tuned)
        arrow(0.9, y + 0.25, 1.1, y + 0.25)
        arrow(2.0, y + 0.25, 2.3, y + 0.25)
        arrow(3.2, y + 0.25, 3.4, y + 0.25)
        ax.text(-0.1, y + 0.25, f"stage {s + 1}", ha="right", va="center", fontsize=8)
        if s:
            arrow(3.95, y - 0.4, 3.95, y, color="#e69138")  # carried inter-stage state
        if s < len(rows) - 1:  # tokens go on to the next stage (through patch merging in a hierarchical backbone)
            ax.plot([4.5, 4.65, 4.65, 0.45], [y + 0.25, y + 0.25, y + 0.7, y + 0.7], color="black", lw=1)
            arrow(0.45, y + 0.7, 0.45, y + 0.9)
    arrow(0.8, 0.55, 0.45, 0.85)
    box(0.0, 3.45, 4.5, 0.4, "UPerNet decoder (trained): every stage map → slice logits → stacked into "
        "(B, K, T, H, W)", tuned, 7.5)
    arrow(4.3, 3.15, 4.3, 3.45)
    x0 = 5.2
    steps = [(0.05, "X → down-projection C → C', GELU → V (B, C', T, h, w)"),
             (1.65, "F = 1×1×1 conv (F3 + F5 + Fg)"),
             (2.25, "Inter-FI: A = 1×1×1 conv (concat[F, ψ(A_prev)])"),
             (2.85, "Y = X + GELU(up-projection(V + A)),  C' → C")]
    for y, text in steps:
        box(x0, y, 2.9, 0.35, text, tuned, 6.5)
    box(x0, 0.7, 0.9, 0.7, "1×3×3\n→ 3×1×1\nBN, ReLU: F3", tuned, 6.5)
    box(x0 + 1.0, 0.7, 0.9, 0.7, "1×5×5\n→ 5×1×1\nBN, ReLU: F5", tuned, 6.5)
    box(x0 + 2.0, 0.7, 0.9, 0.7, "|IFFT(FFT(V)·W_f\n+ B_f)|: Fg\none W_f per\nslice frequency", tuned, 6)
    for xa in (x0 + 0.45, x0 + 1.45, x0 + 2.45):
        arrow(xa, 0.4, xa, 0.7)
        arrow(xa, 1.4, xa, 1.65)
    arrow(x0 + 1.45, 2.0, x0 + 1.45, 2.25)
    arrow(x0 + 1.45, 2.6, x0 + 1.45, 2.85)
    ax.text(x0 + 1.45, 3.45, "inside one Med-Adapter", ha="center", fontsize=9, weight="bold")
    ax.set_xlim(-0.9, 8.3)
    ax.set_ylim(-0.1, 4.0)
    ax.axis("off")


def plot_dice_vs_params(ax, summary) -> None:
    """Mean Dice vs tuned parameters (log scale only over a decade or more), one point per row with ± std bars,
    labelled by human name without overlap; ``summary`` has columns row, dice_mean, dice_mean_std,
    tuned_params_m."""
    names = figures.method_names("med_tuning")
    ours = summary.row == "med_tuning"
    for kept, colour, label in ((ours, "C1", "Med-Tuning"), (~ours, "C0", "baselines")):
        ax.errorbar(summary.tuned_params_m[kept], summary.dice_mean[kept], yerr=summary.dice_mean_std[kept], fmt="o",
                    capsize=3, color=colour, label=label)
    scale = figures.set_scale(ax, "x", summary.tuned_params_m)
    figures.label_points(ax, list(summary.tuned_params_m), list(summary.dice_mean),
                         [figures.human(names, row) for row in summary.row])
    ax.set_xlabel(f"tuned parameters (M{', log scale' if scale == 'log' else ''})")
    ax.set_ylabel("mean Dice, anterior + posterior (%)")
    ax.legend(loc="lower right")


@figures.styled
def record_figures(store) -> dict:
    """The figures that ``store``'s records alone make (``mdbench figures``, no retraining): ``dice_vs_params``
    (Table 1's Dice against tuned parameters beside its training memory, as the notebook draws it); none without
    Table 1."""
    records = store.records()
    import matplotlib.pyplot as plt

    frame = summary_frame(records, "table1")
    if frame.empty:
        return {}
    memory = next(r for r in records if r.table == "table1" and r.metric == "train_memory_mb")
    method = memory.notes.split("train memory:")[-1].strip() if "train memory:" in memory.notes else "as recorded"
    seeds = max(len(r.seeds) for r in records if r.table == "table1")
    fig, (ax_params, ax_memory) = plt.subplots(1, 2, figsize=(11, 3.8))
    plot_memory(ax_memory, frame, method)
    ax_params.set_title(f"Table 1 on {memory.dataset}: Dice vs tuned parameters (± std over {seeds} seeds)",
                        fontsize=9)
    plot_dice_vs_params(ax_params, frame)
    fig.tight_layout()
    drawn = {"dice_vs_params": fig}
    curves = {name: store.dir / f"{saved}.csv" for name, saved in CURVE_TABLES.items()}
    if all(path.is_file() for path in curves.values()):
        drawn["curves"] = curves_figure({name: pd.read_csv(path) for name, path in curves.items()})
    return drawn


CURVE_TABLES = {"Table 1": "curves_table1", "Table 2": "curves_table2"}  # the tables whose curves the notebook saves


def curves_figure(curves: dict[str, pd.DataFrame]):
    """One panel per table (``CURVE_TABLES``) of :func:`plot_curves`; ``curves``: each table's runs' curves (the
    ``curves`` of :class:`RowResult`, concatenated), as the notebook saves them beside the tables
    (named by ``CURVE_TABLES``), from which ``mdbench figures`` redraws it."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(11, 3.6), sharey=True, squeeze=False)
    for ax, (name, frame) in zip(axes[0], curves.items(), strict=True):
        plot_curves(ax, frame)
        ax.set_title(f"{name}: training loss per epoch (mean over seeds × folds)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_memory(ax, summary, method: str) -> None:
    """Training memory of each row (± std) as horizontal bars labelled by human name; ``method``: how it was
    measured. ``summary`` has columns row, train_memory_mb, train_memory_mb_std."""
    names = figures.method_names("med_tuning")
    ax.barh([figures.human(names, row) for row in summary.row], summary.train_memory_mb,
            xerr=summary.train_memory_mb_std, color="C0")
    ax.set_xlabel(f"training memory (MiB; {method})")


def mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean training loss per epoch of each row over its runs (seeds × folds): one line per epoch, one column per
    row, from the ``curves`` of :class:`RowResult`."""
    return curves.pivot_table(index="epoch", columns="row", values="train_loss", aggfunc="mean", sort=False)


def plot_curves(ax, curves: pd.DataFrame) -> None:
    """Each row's training loss per epoch: the mean over its runs (seeds × folds) and a band from the lowest run to
    the highest (Med-Tuning in black); ``curves`` as in :class:`RowResult`."""
    from matplotlib.ticker import MaxNLocator

    names = figures.method_names("med_tuning")
    for row, own in curves.groupby("row", sort=False):
        by_epoch = own.groupby("epoch")["train_loss"]
        mean = by_epoch.mean()
        style = {"color": "black", "lw": 2} if row == "med_tuning" else {}
        (line,) = ax.plot(mean.index, mean.to_numpy(), label=figures.human(names, str(row)), **style)
        ax.fill_between(mean.index, by_epoch.min().to_numpy(), by_epoch.max().to_numpy(), color=line.get_color(),
                        alpha=0.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (soft Dice, 2 classes)")
    ax.legend(fontsize=7)


def plot_slices(axes, volumes: Volumes, predictions: dict[str, torch.Tensor], case: int = 0) -> None:
    """Image, ground truth and each row's prediction (by human name) on the slice of ``case`` with the most
    foreground; a legend of the two structures' colours on the ground truth."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    names = figures.method_names("med_tuning")
    overlay = colormaps["autumn"]
    label = volumes.labels[case]
    t = int((label > 0).flatten(1).sum(1).argmax())
    panels = {"image": None, "ground truth": label, **predictions}
    for ax, (title, mask) in zip(axes, panels.items(), strict=False):
        ax.imshow(volumes.images[case, 0, t], cmap="gray")
        if mask is not None:
            ax.imshow(np.ma.masked_equal(mask[t].numpy(), 0), cmap="autumn", vmin=1, vmax=len(CLASSES) - 1,
                      alpha=0.6, interpolation="nearest")
        ax.set_title(figures.human(names, title), fontsize=8)
        ax.axis("off")
        if title == "ground truth":
            ax.legend(handles=[Patch(color=overlay(k / max(len(CLASSES) - 2, 1)), label=name)
                               for k, name in enumerate(CLASSES[1:])], fontsize=6, loc="lower center",
                      bbox_to_anchor=(0.5, -0.25), ncol=len(CLASSES) - 1, frameon=False)

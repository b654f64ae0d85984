"""Med-Tuning experiment glue: volumes as tensors, each method's model, training, scores and costs.

Every method shares the slice-wise model (``build_model("slicewise_segmenter")``: one backbone, one UPerNet
decoder) and differs only in what is trained (:func:`mdbench.tuning.apply_method`), except the reference 3D network
trained from scratch (``build_model("unet3d")``, MONAI's ``UNet``). All are trained with the paper's recipe at
reduced scale: softmax soft-Dice summed over the foreground classes (MONAI ``DiceLoss``), Adam with amsgrad and weight
decay 1e-5, the official warm-up + cosine learning-rate shape; no augmentation, no sliding window, no test-time
flips.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from monai.losses import DiceLoss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import metrics, train
from mdbench.data.base import RealDataset
from mdbench.data.registry import is_present, load_dataset
from mdbench.data.synthetic import SyntheticVolumes
from mdbench.efficiency import peak_memory
from mdbench.models import build_model
from mdbench.models.slicewise import MedAdapterConfig
from mdbench.params import NotebookConfig
from mdbench.repro import seed_rngs
from mdbench.tuning import apply_method, trainable_report

CLASSES = ("background", "anterior", "posterior")
TABLE1_ROWS = ("scratch_unet3d", "full", "head", "lora", "vpt", "adaptformer", "med_tuning")
PET_ROWS = ("head", "lora", "vpt", "adaptformer")
ABLATION_SWITCHES = {"no_3x3": {"branch3": False}, "no_5x5": {"branch5": False}, "no_fft": {"fft": False},
                     "no_inter_fi": {"inter_fi": False}}

__all__ = ["ABLATION_SWITCHES", "CLASSES", "PER_VOLUME", "PET_ROWS", "TABLE1_ROWS", "Config", "RowResult",
           "Volumes", "ablation_adapters", "build_row_model", "dice_loss", "draw_framework", "evaluate", "load_data",
           "load_volumes", "per_volume_lines", "plot_dice_vs_params", "plot_slices", "record", "run",
           "summary_frame", "training_memory_mb", "volume_means", "wide_table"]


@dataclass(frozen=True)
class Config(NotebookConfig):
    """The notebook's parameters: everything that decides a run's numbers (recorded as each record's config).
    The deterministic mode is the session's (:func:`mdbench.notebook.start`)."""

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

    @property
    def warmup_epochs(self) -> int:
        """The official recipe warms up for a tenth of the epochs (at least one)."""
        return max(1, self.epochs // 10)

    def as_record(self) -> dict[str, Any]:
        return {**super().as_record(), "warmup_epochs": self.warmup_epochs}


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class Volumes:
    """One split as tensors: ``images`` (N, 1, T, S, S) in [0, 1], ``labels`` (N, T, S, S) int64, ``spacing`` (N, 3)
    mm of the resampled voxels, ``ids``; ``dataset`` and ``checksum`` name the data for records."""

    images: torch.Tensor
    labels: torch.Tensor
    spacing: np.ndarray
    ids: list[str]
    dataset: str
    checksum: str

    def __len__(self) -> int:
        return len(self.ids)


def load_data(cfg: Config) -> tuple[Volumes, Volumes]:
    """The run's training and test volumes (``cfg.n_train`` and ``cfg.n_test`` of them) of ``cfg.dataset``."""
    if cfg.dataset != "synthetic" and not is_present(cfg.dataset, cfg.data_dir):
        raise FileNotFoundError(f"{cfg.dataset} is not under {cfg.data_dir or '$MDBENCH_DATA_DIR'}: see "
                                f"data_cards/{cfg.dataset}.md, or run the smoke profile on synthetic volumes")
    return (load_volumes(cfg.dataset, "train", cfg.n_train, cfg, cfg.data_dir),
            load_volumes(cfg.dataset, "test", cfg.n_test, cfg, cfg.data_dir))


def load_volumes(dataset: str, split: str, n: int | None, cfg: Config, data_dir: str | None = None) -> Volumes:
    """The first ``n`` volumes (all with None) of ``split``, resampled to (T, S, S) = (num_slices, image_size,
    image_size).

    ``dataset``: ``"synthetic"`` (:class:`SyntheticVolumes`, generated at that shape) or ``"msd_hippocampus"``
    (MONAI ``Resize``: trilinear image, nearest label). Intensities are min-max scaled per volume to [0, 1], the
    input range of LiteMedSAM. The slice axis T is the volume's first axis (left-right in the RAS MSD volumes).
    """
    shape = (cfg.num_slices, cfg.image_size, cfg.image_size)
    source: SyntheticVolumes | RealDataset
    if dataset == "synthetic":
        source = SyntheticVolumes(n or 1, shape=shape, seed=0, split=split, normalize="minmax")
    else:
        # the registry types its result as Dataset; every real dataset's loader is a RealDataset (len, checksum)
        source = cast(RealDataset, load_dataset(dataset, split=split, data_dir=data_dir, normalize="minmax",
                                                spatial_size=shape))
    count = len(source) if n is None else min(n, len(source))
    if count == 0:
        raise ValueError(f"{dataset} split {split!r} has no volumes")
    items = [source[i] for i in range(count)]
    return Volumes(images=torch.stack([it["image"] for it in items]).float(),
                   labels=torch.stack([it["label"] for it in items]).long(),
                   spacing=np.array([it["spacing"] for it in items], dtype=np.float64),
                   ids=[it["id"] for it in items], dataset=dataset, checksum=source.checksum)


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


def evaluate(model: nn.Module, volumes: Volumes, device: str, batch_size: int = 2) -> dict[str, Any]:
    """Scores on ``volumes``: Dice (%) per foreground class and over both, HD95 (mm) over both classes, predictions,
    and the per-volume values each score is the mean of (``per_volume``, :func:`per_volume_lines`). A score over
    both classes is the mean over every scored (volume, class) pair: the mean of the two classes' scores when every
    volume scores both (every test volume of MSD Hippocampus has both).

    Per-case values follow :mod:`mdbench.metrics` (a class absent from both is skipped). A class the target has and
    the prediction misses gets HD95 = the volume's diagonal in mm (a worst-case distance, as BraTS scores an empty
    prediction), so a model that finds nothing is not rewarded by an undefined distance.
    """
    loader = DataLoader(TensorDataset(volumes.images, volumes.labels), batch_size=batch_size)
    pred, target = train.predict(model, loader, device, fn=lambda m, b: (m(b[0]).argmax(dim=1).byte(), b[1]))
    dice = metrics.dice_per_class(pred, target, len(CLASSES)).numpy()  # (N, 2)
    hd = []
    for case in range(len(volumes)):
        spacing = volumes.spacing[case]
        h = metrics.hd95(pred[case:case + 1], target[case:case + 1], len(CLASSES), spacing=spacing.tolist())[0]
        present = torch.tensor([(target[case] == c).any().item() for c in range(1, len(CLASSES))])
        diagonal = float(np.linalg.norm(np.array(target.shape[1:]) * spacing))
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


@dataclass
class RowResult:
    """Per-seed metrics of one row (``values[metric]`` is a list over ``seeds``), the per-volume values behind the
    scores (``per_volume``: lines ``row, seed, unit, metric, value, weight`` of :func:`per_volume_lines`, the
    ``samples`` of :meth:`mdbench.notebook.Session.record_frame`), one example prediction (seed ``seeds[0]``, the
    first test volume), where the weights came from and how memory was measured."""

    row: str
    seeds: list[int]
    values: dict[str, list[float]]
    per_volume: pd.DataFrame
    example_pred: torch.Tensor | None  # None only for a row run over no seeds
    init: str
    memory_method: str

    def subset(self, seeds: Iterable[int]) -> RowResult:
        """The same row restricted to ``seeds`` (all of them among ``self.seeds``)."""
        seeds = list(seeds)
        missing = sorted(set(seeds) - set(self.seeds))
        if missing:
            raise ValueError(f"row {self.row!r} has no run for seeds {missing} (it has {self.seeds})")
        keep = [self.seeds.index(s) for s in seeds]
        values = {k: [v[i] for i in keep] for k, v in self.values.items()}
        per_volume = self.per_volume[self.per_volume["seed"].isin(seeds)]
        return RowResult(self.row, seeds, values, per_volume, self.example_pred, self.init, self.memory_method)


def run(row: str, cfg: Config, train_set: Volumes, test_set: Volumes, seeds: list[int],
            adapter: MedAdapterConfig | None = None, progress: bool = False) -> RowResult:
    """Train and score one row once per seed: Table 1/2 metrics per seed, every seed on all of ``test_set``.

    Metrics: ``dice_anterior``, ``dice_posterior``, ``dice_mean`` (%), ``hd95`` (mm), each the mean of per-volume
    values (kept in ``per_volume``), ``tuned_params_m`` (trainable parameters, millions), ``tuned_params_pct`` (% of
    the row's model), ``train_memory_mb``, ``s_per_epoch`` (wall seconds of one training epoch).
    """
    values: dict[str, list[float]] = {}
    per_volume: list[pd.DataFrame] = []
    example: torch.Tensor | None = None
    init, memory_method = "", ""
    for seed in seeds:
        seed_rngs(seed)
        generator = torch.Generator().manual_seed(seed)
        model = build_row_model(row, cfg, adapter).to(cfg.device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, amsgrad=True)
        loader = DataLoader(TensorDataset(train_set.images, train_set.labels), batch_size=cfg.batch_size,
                            shuffle=True, generator=generator)
        history = train.fit(model, loader, step_fn=_step(dice_loss()), optimizer=optimizer, epochs=cfg.epochs,
                            scheduler=_paper_schedule(optimizer, cfg.epochs, cfg.warmup_epochs),
                            device=cfg.device, amp=cfg.amp, progress=progress, seed=seed)
        seconds = float(np.mean([epoch["seconds"] for epoch in history.epochs]))
        scores = evaluate(model, test_set, cfg.device, cfg.batch_size)
        # after scoring: the measured step runs in train mode and would move BatchNorm statistics
        memory, memory_method = training_memory_mb(model, next(iter(loader)), optimizer, cfg.device, cfg.amp)
        report = trainable_report(model)
        per_volume.append(scores["per_volume"].assign(row=row, seed=seed))
        seed_values = {**{k: scores[k] for k in PER_VOLUME}, "tuned_params_m": report.trainable / 1e6,
                       "tuned_params_pct": report.percent, "train_memory_mb": memory, "s_per_epoch": seconds}
        for key, value in seed_values.items():
            values.setdefault(key, []).append(value)
        if example is None:
            # every model that build_model makes carries its mdbench_init, a str (mdbench.models)
            example, init = scores["pred"][0], cast(str, model.mdbench_init)
        del model, optimizer
    empty = pd.DataFrame(columns=["row", "seed", "unit", "metric", "value", "weight"])
    lines = pd.concat(per_volume, ignore_index=True) if per_volume else empty
    return RowResult(row, list(seeds), values, lines, example, init, memory_method)


# ---------------------------------------------------------------------------------------------------- records
UNITS = {"dice_anterior": "%", "dice_posterior": "%", "dice_mean": "%", "hd95": "mm", "tuned_params_m": "M",
         "tuned_params_pct": "%", "train_memory_mb": "MiB", "s_per_epoch": "s"}
TABLE2_METRICS = ("dice_anterior", "dice_posterior", "dice_mean", "hd95", "tuned_params_m")


def record(result: RowResult, volumes: Volumes, config: dict[str, Any], names: Iterable[str] = tuple(UNITS)
           ) -> pd.DataFrame:
    """The records of one row (``names``: its metrics) as a frame for :meth:`mdbench.notebook.Session.record_frame`:
    one line per (metric, seed). Their per-volume outputs are ``result.per_volume`` (its ``samples``)."""
    notes = f"weights: {result.init}; train memory: {result.memory_method}"
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
    """Mean Dice vs tuned parameters (log scale), one point per row with ± std bars; ``summary`` has columns
    row, dice_mean, dice_mean_std, tuned_params_m."""
    for item in summary.itertuples():
        ax.errorbar(item.tuned_params_m, item.dice_mean, yerr=item.dice_mean_std, fmt="o", capsize=3,
                    color="#e69138" if item.row == "med_tuning" else "#3d85c6")
        ax.annotate(item.row, (item.tuned_params_m, item.dice_mean), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("tuned parameters (M, log scale)")
    ax.set_ylabel("mean Dice, anterior + posterior (%)")


def plot_slices(axes, volumes: Volumes, predictions: dict[str, torch.Tensor], case: int = 0) -> None:
    """Image, ground truth and each row's prediction on the slice of ``case`` with the most foreground."""
    label = volumes.labels[case]
    t = int((label > 0).flatten(1).sum(1).argmax())
    panels = {"image": None, "ground truth": label, **predictions}
    for ax, (title, mask) in zip(axes, panels.items(), strict=False):
        ax.imshow(volumes.images[case, 0, t], cmap="gray")
        if mask is not None:
            ax.imshow(np.ma.masked_equal(mask[t].numpy(), 0), cmap="autumn", vmin=1, vmax=len(CLASSES) - 1,
                      alpha=0.6, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")

"""DAFT's three training stages on challenge cases: encoder KD, general fine-tuning, data-aware fine-tuning.

1. :func:`distill_encoder`: ``L_KD = MSE(E_student(x), E_teacher(x))`` on (B, 256, 64, 64) embeddings; the teacher's
   embeddings are computed once (:func:`embed_images`) and reused every epoch (the teacher is frozen).
2. :func:`finetune`: the merged model (student encoder + LiteMedSAM prompt encoder and mask decoder) trained with
   Dice + BCE + IoU-prediction loss (:class:`mdbench.losses.segmentation.SegmentationLoss`), everything trainable
   except the prompt encoder, early stopping on the validation loss (patience 7 in DAFT's ``main`` branch).
3. :func:`data_aware_finetune`: one copy of the generally fine-tuned model per expert, fine-tuned on that expert's
   subset only (DAFT proper). A 3D subset expands each volume into all its slices with an object.

Optimiser and schedule of the paper for all stages: AdamW (lr 5e-5, betas 0.9/0.999, weight decay 0.01),
``ReduceLROnPlateau(factor 0.9, patience 5)`` stepped on the epoch-mean training loss.

Sampling (:class:`PromptSamples`, as the paper's data loader): per item one 2D image or one slice of a volume
(random per epoch, or every slice), challenge preprocessing (longest side 256, [0, 1] min-max, zero pad), one
random object binarised, random horizontal and vertical flips (p = 0.5 each), box = the object's tight box in the
256 frame with each side moved out by U{0..5} px. Validation items are fixed (seeded object, slice; no flips, no
jitter) so the validation loss is deterministic. KD uses the images without augmentation (a flipped image's
teacher embedding is not the flipped embedding, and the cached targets must match their inputs).

On a GPU (the ``gpu`` profile; every switch off by default, so the CPU profiles run as before):

- :class:`PromptBank` holds every image / slice an item can draw, preprocessed once on the device, with each
  object's mask and tight box; a batch of items (random slice and object, flips, box jitter) is a few tensor
  operations there, no per-item Python and no host-to-device copy per step. KD's inputs and targets lie on the
  device too (``Speed.on_device``).
- :class:`Speed`: bf16 autocast, channels-last image encoder, ``torch.compile``d image encoder, fused AdamW.
- KD can watch a held-out embedding MSE (``val_images``) and stop when it flattens (:class:`Plateau`: less than a
  relative ``min_delta`` of improvement for ``patience`` epochs), keeping the best epoch, as DAFT's ``distill.py``
  on ``main`` does with its validation split.

BatchNorm: the EfficientViT student normalises with batch statistics while training. With the small batches of a
CPU run its running statistics lag behind, and in eval mode the model can then lose what it learned; so the
statistics are recomputed on training images after KD, before each validation and after fine-tuning
(:func:`recalibrate_batchnorm`, PyTorch's ``update_bn``).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset

from mdbench.data.boxprompt import IMAGE_SIZE, resized_hw
from mdbench.losses.segmentation import SegmentationLoss
from mdbench.models.litemedsam import LiteMedSAM, preprocess_image
from mdbench.papers.efcm.bags import row_batches
from mdbench.repro import seed_worker
from mdbench.train import EarlyStopping, History, StepFn, fit

__all__ = [
    "BankBatches",
    "Plateau",
    "PromptBank",
    "PromptSamples",
    "Speed",
    "data_aware_finetune",
    "distill_encoder",
    "embed_images",
    "embedding_mse",
    "encoder_inputs",
    "finetune",
    "recalibrate_batchnorm",
]

BBOX_SHIFT = 5  # px, the paper's box jitter in the 256 frame


def _resized_labels(gts: np.ndarray) -> torch.Tensor:
    """(H, W) label map -> (256, 256) int64: nearest-resized so the longest side is 256, zero-padded."""
    height, width = resized_hw(gts.shape)
    labels = torch.from_numpy(gts.astype(np.int64))[None, None].float()
    labels = F.interpolate(labels, size=(height, width), mode="nearest")[0, 0].long()
    return F.pad(labels, (0, IMAGE_SIZE - width, 0, IMAGE_SIZE - height))


def _slices(case: dict) -> list[int | None]:
    """Slices of a case with an object still visible at 256 px ([None] for such a 2D image, [] without one)."""
    gts = np.asarray(case["gts"])
    if case["dims"] == 2:
        return [None] if bool(_resized_labels(gts).any()) else []
    return [int(z) for z in np.flatnonzero(gts.reshape(len(gts), -1).any(axis=1)) if bool(_resized_labels(gts[z]).any())]


def _objects(labels: torch.Tensor) -> torch.Tensor:
    """The object labels (> 0) present in a label map, ascending."""
    present = torch.unique(labels)
    return present[present > 0]


class PromptSamples(Dataset):
    """Training items from challenge cases: one object of one image / slice with its box prompt.

    Args:
        cases: cases from :func:`mdbench.papers.daft.cases.read_cases` (``imgs``, ``gts``, ``dims``).
        slices: ``"random"``: one item per case, a random slice with an object each time (general FT);
            ``"all"``: one item per slice with an object (DAFT on 3D subsets). 2D cases give one item either way.
        augment: flips, box jitter and random object / slice; False gives a fixed item per index (validation).
        seed: the seed of the fixed choices when ``augment`` is False.
        max_slices: with ``slices="all"``, at most this many evenly spaced slices per volume (None: all of them).

    Items: ``(image (3, 256, 256) float in [0, 1], mask (1, 256, 256) float in {0, 1}, box (4,) float xyxy)``.
    """

    def __init__(self, cases: Sequence[dict], slices: Literal["random", "all"] = "random", augment: bool = True,
                 bbox_shift: int = BBOX_SHIFT, seed: int = 0, max_slices: int | None = None) -> None:
        if slices not in ("random", "all"):
            raise ValueError(f"slices must be 'random' or 'all', got {slices!r}")
        self.cases, self.augment, self.bbox_shift, self.seed = list(cases), augment, bbox_shift, seed
        self.items: list[tuple[int, list[int | None]]] = []
        for index, case in enumerate(self.cases):
            present = _slices(case)
            if not present:
                continue
            if slices == "all" and max_slices is not None and len(present) > max_slices:
                present = [present[i] for i in np.linspace(0, len(present) - 1, max_slices).round().astype(int)]
            self.items.extend([(index, present)] if slices == "random" else [(index, [z]) for z in present])
        if not self.items:
            raise ValueError("PromptSamples got no case with a labelled object")

    def __len__(self) -> int:
        return len(self.items)

    def _rng(self, index: int) -> np.random.Generator:
        if self.augment:  # drawn from torch's generator so that fit(seed=...) fixes the whole run
            return np.random.default_rng(int(torch.randint(2**31 - 1, ())))
        return np.random.default_rng([self.seed, index])

    def choice(self, index: int, rng: np.random.Generator) -> tuple[int, int | None, torch.Tensor, int]:
        """Item ``index``'s draw from ``rng``: its case's index, the slice (None in 2D), the slice's (256, 256)
        labels and the drawn object's label."""
        case_index, candidates = self.items[index]
        case = self.cases[case_index]
        z = candidates[int(rng.integers(len(candidates)))]
        labels = _resized_labels(case["gts"] if z is None else case["gts"][z])
        present = _objects(labels)  # never empty: _slices kept only slices with an object at 256 px
        return case_index, z, labels, int(present[int(rng.integers(len(present)))])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = self._rng(index)
        case_index, z, labels, label = self.choice(index, rng)
        case = self.cases[case_index]
        x = preprocess_image(case["imgs"] if z is None else case["imgs"][z])[0]
        mask = (labels == label)[None].float()
        if self.augment:
            for dim, flip in ((2, rng.random() < 0.5), (1, rng.random() < 0.5)):  # horizontal, vertical
                if flip:
                    x, mask = x.flip(dim), mask.flip(dim)
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        shift = rng.integers(0, self.bbox_shift + 1, 4) if self.augment else np.zeros(4, dtype=int)
        box = torch.tensor([max(0, int(xs.min()) - shift[0]), max(0, int(ys.min()) - shift[1]),
                            min(IMAGE_SIZE - 1, int(xs.max()) + shift[2]),
                            min(IMAGE_SIZE - 1, int(ys.max()) + shift[3])], dtype=torch.float32)
        return x, mask, box


def _below(draws: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``floor(draws * counts)`` for uniform draws in [0, 1): a uniform integer in 0..counts-1 for each (N,) row."""
    return (draws * counts).long().clamp_max(counts - 1)


def _tight_box(mask: torch.Tensor) -> torch.Tensor:
    """(4,) float xyxy tight box of a non-empty (256, 256) bool mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


class PromptBank:
    """:class:`PromptSamples`' items held on ``device``, so that a batch of them is a few tensor operations there.

    Every image or slice an item can draw is preprocessed once (``images``, (F, 3, 256, 256) float), with the mask
    (``masks``, (O, 256, 256) bool) and tight box (``boxes``, (O, 4) float xyxy) of each of its objects; no
    per-item Python runs and nothing is copied from the host while training.

    - :meth:`fixed` gives exactly what ``PromptSamples(cases, slices, augment=False, seed=seed,
      max_slices=max_slices)`` gives for the same indices (validation items, BatchNorm calibration images);
    - :meth:`sample` draws as ``augment=True`` does (a random slice of the item's, a random object of the
      slice's, horizontal and vertical flips with p = 0.5 each, each box side moved out by U{0..bbox_shift} px
      and clipped to the image), from a torch generator on ``device`` rather than a NumPy generator per item.

    Args: as :class:`PromptSamples`, and the ``device`` the bank lies on.
    """

    def __init__(self, cases: Sequence[dict], slices: Literal["random", "all"] = "random", seed: int = 0,
                 max_slices: int | None = None, bbox_shift: int = BBOX_SHIFT,
                 device: str | torch.device = "cpu") -> None:
        samples = PromptSamples(cases, slices, augment=False, seed=seed, max_slices=max_slices)
        self.bbox_shift = bbox_shift
        frames: dict[tuple[int, int | None], int] = {}  # (case index, slice) -> frame
        images: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        boxes: list[torch.Tensor] = []
        frame_first: list[int] = []  # each frame's first object
        frame_labels: list[list[int]] = []
        item_frames: list[int] = []
        item_first: list[int] = []  # each item's first entry of item_frames
        fixed: list[int] = []  # the object of each item's fixed draw
        for index, (case_index, candidates) in enumerate(samples.items):
            item_first.append(len(item_frames))
            for z in candidates:
                if (case_index, z) not in frames:
                    frames[case_index, z] = len(frames)
                    case = samples.cases[case_index]
                    images.append(preprocess_image(case["imgs"] if z is None else case["imgs"][z])[0])
                    labels = _resized_labels(case["gts"] if z is None else case["gts"][z])
                    frame_first.append(len(masks))
                    frame_labels.append(_objects(labels).tolist())
                    for label in frame_labels[-1]:
                        masks.append(labels == label)
                        boxes.append(_tight_box(masks[-1]))
                item_frames.append(frames[case_index, z])
            case_index, z, _, label = samples.choice(index, samples._rng(index))
            frame = frames[case_index, z]
            fixed.append(frame_first[frame] + frame_labels[frame].index(label))
        self.images = torch.stack(images).to(device)
        self.device = self.images.device  # with its index ("cuda:0"), as the generators drawn from must be
        self.masks = torch.stack(masks).to(self.device)
        self.boxes = torch.stack(boxes).to(self.device)
        self.object_frame = torch.tensor([f for f, labels in enumerate(frame_labels) for _ in labels], device=self.device)
        self.frame_first = torch.tensor(frame_first, device=self.device)
        self.frame_count = torch.tensor([len(labels) for labels in frame_labels], device=self.device)
        self.item_frames = torch.tensor(item_frames, device=self.device)
        self.item_first = torch.tensor(item_first, device=self.device)
        self.item_count = torch.tensor([len(candidates) for _, candidates in samples.items], device=self.device)
        self.fixed_object = torch.tensor(fixed, device=self.device)

    def __len__(self) -> int:
        return len(self.item_first)

    def fixed(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed items ``index`` ((B,) long): images (B, 3, 256, 256), masks (B, 1, 256, 256) float in {0, 1}
        and boxes (B, 4) xyxy, those of ``PromptSamples(..., augment=False)``."""
        objects = self.fixed_object[index.to(self.device)]
        return self.images[self.object_frame[objects]], self.masks[objects][:, None].float(), self.boxes[objects]

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmented draws of the items ``index`` ((B,) long) from ``generator`` (on the bank's device): images
        (B, 3, 256, 256), masks (B, 1, 256, 256) float in {0, 1} and boxes (B, 4) xyxy, flipped with their images."""
        index = index.to(self.device)
        draws = torch.rand(len(index), 4, generator=generator, device=self.device)
        frames = self.item_frames[self.item_first[index] + _below(draws[:, 0], self.item_count[index])]
        objects = self.frame_first[frames] + _below(draws[:, 1], self.frame_count[frames])
        images, masks = self.images[frames], self.masks[objects][:, None].float()
        hflip, vflip = draws[:, 2] < 0.5, draws[:, 3] < 0.5
        for flip, dim in ((hflip, 3), (vflip, 2)):  # horizontal (width), vertical (height)
            images = torch.where(flip[:, None, None, None], images.flip(dim), images)
            masks = torch.where(flip[:, None, None, None], masks.flip(dim), masks)
        x0, y0, x1, y1 = self.boxes[objects].unbind(1)
        last = IMAGE_SIZE - 1
        x0, x1 = torch.where(hflip, last - x1, x0), torch.where(hflip, last - x0, x1)
        y0, y1 = torch.where(vflip, last - y1, y0), torch.where(vflip, last - y0, y1)
        shift = torch.randint(0, self.bbox_shift + 1, (len(index), 4), generator=generator, device=self.device)
        boxes = torch.stack([(x0 - shift[:, 0]).clamp_min(0), (y0 - shift[:, 1]).clamp_min(0),
                             (x1 + shift[:, 2]).clamp_max(last), (y1 + shift[:, 3]).clamp_max(last)], dim=1)
        return images, masks, boxes


class BankBatches:
    """Batches of a :class:`PromptBank` for :func:`mdbench.train.fit`: with a ``generator`` (on the bank's device)
    every item once an epoch in a random order, drawn augmented (training); without one the fixed items in order
    (validation). ``drop_last`` leaves out an incomplete last batch (one shape for ``torch.compile``, and never a
    batch of one, which BatchNorm refuses while training)."""

    def __init__(self, bank: PromptBank, batch_size: int, generator: torch.Generator | None = None,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bank, self.batch_size, self.generator, self.drop_last = bank, batch_size, generator, drop_last

    def __len__(self) -> int:
        return len(self.bank) // self.batch_size if self.drop_last else math.ceil(len(self.bank) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n, device = len(self.bank), self.bank.device
        order = (torch.arange(n, device=device) if self.generator is None
                 else torch.randperm(n, generator=self.generator, device=device))
        for first in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[first:first + self.batch_size]
            yield self.bank.fixed(index) if self.generator is None else self.bank.sample(index, self.generator)


class _Loading(TypedDict):
    """DataLoader options shared by the training and validation loaders of :func:`finetune`."""

    batch_size: int
    num_workers: int
    persistent_workers: bool
    pin_memory: bool


def encoder_inputs(cases: Sequence[dict], slices_per_volume: int = 4) -> tuple[torch.Tensor, list[str]]:
    """Preprocessed encoder inputs for KD: every 2D image, and up to ``slices_per_volume`` evenly spaced slices with
    an object from every volume.

    Returns:
        (N, 3, 256, 256) float inputs and their N names: the case's name, ``<name>@z<slice>`` for a slice.
    """
    images: list[torch.Tensor] = []
    names: list[str] = []
    for case in cases:
        present = _slices(case)
        if case["dims"] == 3 and present:
            picks = np.unique(np.linspace(0, len(present) - 1, min(slices_per_volume, len(present))).round().astype(int))
            images.extend(preprocess_image(case["imgs"][present[i]])[0] for i in picks)
            names.extend(f"{case['name']}@z{present[i]}" for i in picks)
        elif case["dims"] == 2:
            images.append(preprocess_image(case["imgs"])[0])
            names.append(case["name"])
    if not images:
        raise ValueError("encoder_inputs got no image")
    return torch.stack(images), names


@torch.no_grad()
def embed_images(encoder: nn.Module | Callable[[np.ndarray], np.ndarray], images: torch.Tensor,
                 batch_size: int = 4, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, 256, 256) -> (N, 256, 64, 64) embeddings, stored as float16 on the CPU (half the memory; the rounding,
    ~1e-3 relative, is far below the KD loss levels).

    ``encoder``: a module (run in eval mode on ``device``) or a numpy callable taking one (1, 3, 256, 256) input,
    such as a parity-checked OpenVINO export (:meth:`mdbench.papers.daft.deploy.runtime.OpenVinoSAM.encode`).
    """
    if not isinstance(encoder, nn.Module):
        return torch.cat([torch.from_numpy(np.asarray(encoder(x[None].numpy()))).half() for x in images])
    was_training = encoder.training
    encoder.eval().to(device)
    out = [encoder(chunk.to(device)).half().cpu() for chunk in images.split(batch_size)]
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def embedding_mse(encoder: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 4,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Mean squared error between ``encoder(images)`` and the teacher's ``targets`` (the KD loss, in eval mode) of
    each image: (N, 3, 256, 256) images and (N, 256, 64, 64) targets -> (N,) float64 (their mean is the KD loss
    over the whole set, every image having as many embedding elements)."""
    predictions = embed_images(encoder, images, batch_size, device).float()
    return (predictions - targets.float()).square().flatten(1).mean(1).double().numpy()


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_batchnorm(encoder: nn.Module, images: torch.Tensor, batch_size: int = 8,
                          device: str | torch.device = "cpu") -> None:
    """Set the BatchNorm running statistics of ``encoder`` to the exact mean / variance over ``images``
    (``torch.optim.swa_utils.update_bn``), then eval mode.

    Training with small batches leaves running statistics that disagree with the batch statistics the weights were
    trained under; in eval mode such a model can lose everything it learned. Recomputing them on the training
    inputs removes that mismatch (the paper's batches of 96 made it negligible).
    """
    if _batchnorms(encoder):
        # a Tensor is a map-style dataset (__getitem__, __len__), which DataLoader's annotation does not admit
        update_bn(DataLoader(images, batch_size=batch_size),  # type: ignore[arg-type]
                  encoder.to(device), device=torch.device(device))
    encoder.eval()


@dataclass(frozen=True)
class Speed:
    """How the student trains on a GPU. Every switch is off by default; ``amp``, ``channels_last`` and ``compile``
    act on CUDA only, so that the CPU runs as before whatever they say.

    - ``amp``: bf16 autocast (:func:`mdbench.train.fit`'s ``amp="bf16"``); the losses are computed in fp32.
    - ``channels_last``: the image encoder's weights and inputs in NHWC layout, which the tensor cores' convolution
      kernels take directly.
    - ``compile``: the image encoder ``torch.compile``d (each new batch shape and the switch between training and
      evaluation compile once more; the prompt encoder and mask decoder stay eager).
    - ``on_device``: the training data held on the device: KD's inputs and targets, batched by indexing there, and
      fine-tuning's items as a :class:`PromptBank` (any device, the CPU included).
    """

    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    on_device: bool = False

    def fit_amp(self) -> Literal["bf16"] | Literal[False]:
        """:func:`mdbench.train.fit`'s ``amp`` argument."""
        return "bf16" if self.amp else False

    def encoder(self, encoder: nn.Module, device: str | torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """How a training step calls ``encoder`` on ``device``: on CUDA with channels-last weights and inputs and
        compiled, as asked (the weights are converted here, in place); elsewhere ``encoder`` itself."""
        if torch.device(device).type != "cuda":
            return encoder
        if self.channels_last:
            encoder.to(memory_format=torch.channels_last)
        forward = cast(Callable[[torch.Tensor], torch.Tensor], torch.compile(encoder) if self.compile else encoder)
        if not self.channels_last:
            return forward
        return lambda x: forward(x.contiguous(memory_format=torch.channels_last))


@dataclass
class Plateau(EarlyStopping):
    """Early stopping on a loss that flattens: an epoch improves only when it beats the best value so far by more
    than the fraction ``min_delta`` of it (``value < best * (1 - min_delta)``), so that a loss still falling by
    less than that counts as flat whatever its scale. After ``patience`` epochs without improvement training stops,
    and the best epoch's weights are restored (``restore_best``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode != "min":
            raise ValueError(f"Plateau watches a loss (mode 'min'), got mode {self.mode!r}")
        if not 0 <= self.min_delta < 1:
            raise ValueError(f"Plateau.min_delta is a fraction of the best loss in [0, 1), got {self.min_delta}")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        return value < best * (1 - self.min_delta)


def _recalibrating(step: StepFn, encoder: Callable[[nn.Module], nn.Module], calibration: torch.Tensor) -> StepFn:
    """``step`` that, at the first evaluation batch after training steps, first recomputes the BatchNorm statistics
    of ``encoder(model)`` on the ``calibration`` images (:func:`recalibrate_batchnorm`), so that validation
    normalises as training did."""
    stale = [True]  # BatchNorm statistics out of date since the last training step

    def recalibrated(module: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        if module.training:
            stale[0] = True
        elif stale[0]:  # first validation batch of the epoch
            recalibrate_batchnorm(encoder(module), calibration, device=next(module.parameters()).device)
            stale[0] = False
        return step(module, batch)

    return recalibrated


def _optimizer(params, lr: float, weight_decay: float, device: str | torch.device
               ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (fused into one kernel a step on CUDA) and ReduceLROnPlateau, the paper's."""
    fused = True if torch.device(device).type == "cuda" else None
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=fused)
    return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.9, patience=5)


def distill_encoder(student: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epochs: int,
                    lr: float = 5e-5, weight_decay: float = 0.01, batch_size: int = 7,
                    val_images: torch.Tensor | None = None, val_targets: torch.Tensor | None = None,
                    patience: int = 7, min_delta: float = 0.0, calibration_images: int = 256,
                    speed: Speed = Speed(), device: str | torch.device = "cpu", seed: int = 0,
                    progress: bool = False) -> History:
    """KD of an image encoder on fixed teacher embeddings: minimise ``MSE(student(images), targets)``.

    With held-out ``val_images`` and their ``val_targets`` each epoch also records their embedding MSE
    (``val_loss``, in eval mode, BatchNorm recalibrated first on up to ``calibration_images`` training images), and
    training stops once it has flattened (:class:`Plateau` with ``patience`` and the relative ``min_delta``),
    keeping the best epoch's weights; ``epochs`` is then the most it may run. Without them all ``epochs`` run.

    Args:
        student: (B, 3, 256, 256) -> (B, 256, 64, 64), trained in place.
        images: (N, 3, 256, 256) preprocessed inputs (:func:`encoder_inputs`).
        targets: (N, 256, 64, 64) teacher embeddings (:func:`embed_images`).
        val_images, val_targets: (M, 3, 256, 256) and (M, 256, 64, 64), or both None.

    Returns:
        the :class:`~mdbench.train.History`: per epoch ``train_loss`` (and ``val_loss``), the KD loss curve.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} teacher embeddings")
    if (val_images is None) != (val_targets is None) or (
            val_images is not None and val_targets is not None and len(val_images) != len(val_targets)):
        raise ValueError("val_images and val_targets go together, one teacher embedding per image")
    data = device if speed.on_device else "cpu"  # where the batches are gathered
    images, targets = images.to(data), targets.to(data)
    # the order DataLoader(TensorDataset(images, targets), batch_size, shuffle=True, generator) draws
    loader = row_batches(images, targets, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    val = None if val_images is None or val_targets is None else list(
        zip(val_images.to(data).split(batch_size), val_targets.to(data).split(batch_size), strict=True))
    encode = speed.encoder(student, device)

    def kd_step(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, target = batch
        return F.mse_loss(encode(x).float(), target.float()), {}

    step: StepFn = kd_step

    if val is not None:
        picks = np.random.default_rng(seed).permutation(len(images))[:calibration_images]
        step = _recalibrating(step, lambda model: model, images[torch.as_tensor(picks)])
    optimizer, scheduler = _optimizer(student.parameters(), lr, weight_decay, device)
    stopping = Plateau(monitor="val_loss", patience=patience, min_delta=min_delta) if val is not None else None
    history = fit(student, loader, val, step_fn=step, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
                  early_stopping=stopping, amp=speed.fit_amp(), device=device, seed=seed, progress=progress,
                  scheduler_monitor="train_loss")
    recalibrate_batchnorm(student, images, batch_size, device)
    return history


def _finetuning_data(train_cases: Sequence[dict], val_cases: Sequence[dict], slices: Literal["random", "all"],
                     max_slices: int | None, batch_size: int, num_workers: int, calibration_images: int, seed: int,
                     on_device: bool, device: str | torch.device) -> tuple[Any, Any, torch.Tensor]:
    """Fine-tuning's training and validation loaders for :func:`mdbench.train.fit` (no validation loader without
    ``val_cases``) and its BatchNorm calibration images (up to ``calibration_images`` fixed training items, (C, 3,
    256, 256)): :class:`PromptSamples` through DataLoaders, or ``on_device`` :class:`PromptBank` batches there."""
    picks = lambda n: torch.as_tensor(np.random.default_rng(seed).permutation(n)[:calibration_images])  # noqa: E731
    if on_device:
        bank = PromptBank(train_cases, slices, seed=seed, max_slices=max_slices, device=device)
        train = BankBatches(bank, batch_size, torch.Generator(bank.device).manual_seed(seed),
                            drop_last=len(bank) > batch_size)
        val = BankBatches(PromptBank(val_cases, slices, seed=seed, max_slices=max_slices, device=device),
                          batch_size) if val_cases else None
        return train, val, bank.fixed(picks(len(bank)))[0]
    # workers prepare items (resizing, flips) in parallel, which matters on a GPU; seeded through the generator
    loading = _Loading(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
                       pin_memory=torch.device(device).type == "cuda")
    train_loader = DataLoader(PromptSamples(train_cases, slices, augment=True, max_slices=max_slices), shuffle=True,
                              generator=torch.Generator().manual_seed(seed), worker_init_fn=seed_worker, **loading)
    val_loader = DataLoader(PromptSamples(val_cases, slices, augment=False, seed=seed, max_slices=max_slices),
                            **loading) if val_cases else None
    samples = PromptSamples(train_cases, slices, augment=False, seed=seed, max_slices=max_slices)
    return train_loader, val_loader, torch.stack([samples[int(i)][0] for i in picks(len(samples))])


def finetune(model: LiteMedSAM, train_cases: Sequence[dict], val_cases: Sequence[dict] = (), *, epochs: int,
             lr: float = 5e-5, weight_decay: float = 0.01, batch_size: int = 96, patience: int = 7,
             slices: Literal["random", "all"] = "random", max_slices_per_volume: int | None = None,
             calibration_images: int = 256, num_workers: int = 0, speed: Speed = Speed(),
             device: str | torch.device = "cpu", seed: int = 0, progress: bool = False) -> History:
    """Fine-tune ``model`` in place on box-prompted segmentation, prompt encoder frozen.

    With ``val_cases`` the best epoch by validation loss is kept and training stops after ``patience`` epochs
    without improvement; without them all ``epochs`` run. ``speed``: :class:`Speed` (with ``on_device`` the items
    come from a :class:`PromptBank` on ``device``).

    Before each validation and after training, the encoder's BatchNorm statistics are recomputed on up to
    ``calibration_images`` training images (:func:`recalibrate_batchnorm`), so that validation and inference
    normalise as training did (small batches leave running statistics that do not).
    """
    model.prompt_encoder.requires_grad_(False)
    train, val, calibration = _finetuning_data(train_cases, val_cases, slices, max_slices_per_volume, batch_size,
                                               num_workers, calibration_images, seed, speed.on_device, device)
    loss = SegmentationLoss()
    encode = speed.encoder(model.image_encoder, device)

    def step(module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net = cast(LiteMedSAM, module)  # fit passes back the model it was given: ``model``, a LiteMedSAM
        images, masks, boxes = batch
        logits, iou = net.decode(encode(images), boxes)
        terms = loss.terms(logits.float(), iou.float(), masks)
        total = cast(torch.Tensor, sum(terms.values()))  # terms is never empty: a Tensor, never sum's start 0
        return total, {name: value.detach() for name, value in terms.items()}

    optimizer, scheduler = _optimizer([p for p in model.parameters() if p.requires_grad], lr, weight_decay, device)
    stopping = EarlyStopping(monitor="val_loss", patience=patience) if val is not None else None
    history = fit(model, train, val, step_fn=_recalibrating(step, lambda m: cast(LiteMedSAM, m).image_encoder,
                                                            calibration),
                  optimizer=optimizer, scheduler=scheduler, epochs=epochs, early_stopping=stopping,
                  amp=speed.fit_amp(), device=device, seed=seed, progress=progress, scheduler_monitor="train_loss")
    recalibrate_batchnorm(model.image_encoder, calibration, device=device)
    model.eval()
    return history


def data_aware_finetune(general: LiteMedSAM, subsets: Mapping[str, tuple[Sequence[dict], Sequence[dict]]],
                        volumetric: Sequence[str] = ("3D",), **finetune_kwargs) -> dict[str, tuple[LiteMedSAM, History]]:
    """DAFT proper: a copy of ``general`` fine-tuned on each subset.

    Args:
        general: the generally fine-tuned model (left unchanged).
        subsets: expert name -> (train cases, val cases).
        volumetric: experts whose volumes are expanded into all their slices (``slices="all"``; cap them with
            ``max_slices_per_volume``).
        **finetune_kwargs: passed to :func:`finetune` (epochs, lr, batch_size, patience, device, seed, ...).

    Returns:
        expert name -> (fine-tuned model, its History).
    """
    experts = {}
    for name, (train_cases, val_cases) in subsets.items():
        expert = copy.deepcopy(general)
        slices: Literal["random", "all"] = "all" if name in volumetric else "random"
        experts[name] = (expert, finetune(expert, train_cases, val_cases, slices=slices, **finetune_kwargs))
    return experts

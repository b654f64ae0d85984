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

BatchNorm: the EfficientViT student normalises with batch statistics while training. With the small batches of a
CPU run its running statistics lag behind, and in eval mode the model can then lose what it learned; so the
statistics are recomputed on training images after KD, before each validation and after fine-tuning
(:func:`recalibrate_batchnorm`, PyTorch's ``update_bn``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mdbench.data.boxprompt import IMAGE_SIZE, resized_hw
from mdbench.losses.segmentation import SegmentationLoss
from mdbench.models.litemedsam import LiteMedSAM, preprocess_image
from mdbench.repro import seed_worker
from mdbench.train import EarlyStopping, History, fit

__all__ = [
    "PromptSamples",
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = self._rng(index)
        case_index, candidates = self.items[index]
        case = self.cases[case_index]
        z = candidates[int(rng.integers(len(candidates)))]
        image = case["imgs"] if z is None else case["imgs"][z]
        labels = _resized_labels(case["gts"] if z is None else case["gts"][z])
        present = torch.unique(labels)
        present = present[present > 0]  # never empty: _slices kept only slices with an object at 256 px
        label = present[int(rng.integers(len(present)))]
        x = preprocess_image(image)[0]
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


class _Loading(TypedDict):
    """DataLoader options shared by the training and validation loaders of :func:`finetune`."""

    batch_size: int
    num_workers: int
    persistent_workers: bool


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


def _optimizer(params, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.9, patience=5)


def distill_encoder(student: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epochs: int,
                    lr: float = 5e-5, weight_decay: float = 0.01, batch_size: int = 7,
                    device: str | torch.device = "cpu", seed: int = 0, progress: bool = False) -> History:
    """KD of an image encoder on fixed teacher embeddings: minimise ``MSE(student(images), targets)``.

    Args:
        student: (B, 3, 256, 256) -> (B, 256, 64, 64), trained in place.
        images: (N, 3, 256, 256) preprocessed inputs (:func:`encoder_inputs`).
        targets: (N, 256, 64, 64) teacher embeddings (:func:`embed_images`).
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} teacher embeddings")
    loader = DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))

    def step(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, target = batch
        return F.mse_loss(model(x), target.float()), {}

    optimizer, scheduler = _optimizer(student.parameters(), lr, weight_decay)
    history = fit(student, loader, step_fn=step, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
                  device=device, seed=seed, progress=progress, scheduler_monitor="train_loss")
    recalibrate_batchnorm(student, images, batch_size, device)
    return history


def finetune(model: LiteMedSAM, train_cases: Sequence[dict], val_cases: Sequence[dict] = (), *, epochs: int,
             lr: float = 5e-5, weight_decay: float = 0.01, batch_size: int = 96, patience: int = 7,
             slices: Literal["random", "all"] = "random", max_slices_per_volume: int | None = None,
             calibration_images: int = 256, num_workers: int = 0, device: str | torch.device = "cpu",
             seed: int = 0, progress: bool = False) -> History:
    """Fine-tune ``model`` in place on box-prompted segmentation, prompt encoder frozen.

    With ``val_cases`` the best epoch by validation loss is kept and training stops after ``patience`` epochs
    without improvement; without them all ``epochs`` run.

    Before each validation and after training, the encoder's BatchNorm statistics are recomputed on up to
    ``calibration_images`` training images (:func:`recalibrate_batchnorm`), so that validation and inference
    normalise as training did (small batches leave running statistics that do not).
    """
    model.prompt_encoder.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    # workers prepare items (resizing, flips) in parallel, which matters on a GPU; seeded through the generator
    loading = _Loading(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
    train = DataLoader(PromptSamples(train_cases, slices, augment=True, max_slices=max_slices_per_volume),
                       shuffle=True, generator=generator, worker_init_fn=seed_worker, **loading)
    val = DataLoader(PromptSamples(val_cases, slices, augment=False, seed=seed, max_slices=max_slices_per_volume),
                     **loading) if val_cases else None
    loss = SegmentationLoss()

    samples = PromptSamples(train_cases, slices, augment=False, seed=seed, max_slices=max_slices_per_volume)
    picks = np.random.default_rng(seed).permutation(len(samples))[:calibration_images]
    calibration = torch.stack([samples[int(i)][0] for i in picks])
    stale = [True]  # BatchNorm statistics out of date since the last training step

    def step(module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net = cast(LiteMedSAM, module)  # fit passes back the model it was given: ``model``, a LiteMedSAM
        images, masks, boxes = batch
        if net.training:
            stale[0] = True
        elif stale[0]:  # first validation batch of the epoch
            recalibrate_batchnorm(net.image_encoder, calibration, device=images.device)
            stale[0] = False
        logits, iou = net(images, boxes)
        terms = loss.terms(logits, iou, masks)
        total = cast(torch.Tensor, sum(terms.values()))  # terms is never empty: a Tensor, never sum's start 0
        return total, {name: value.detach() for name, value in terms.items()}

    optimizer, scheduler = _optimizer([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    stopping = EarlyStopping(monitor="val_loss", patience=patience) if val is not None else None
    history = fit(model, train, val, step_fn=step, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
                  early_stopping=stopping, device=device, seed=seed, progress=progress,
                  scheduler_monitor="train_loss")
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

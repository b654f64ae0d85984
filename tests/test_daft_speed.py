"""DAFT's gpu path on the CPU: the prompt bank against the per-sample items, KD on held-out embeddings that stops
when the loss flattens, and the device-resident KD and fine-tuning against the default path."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mdbench.data.synthetic import write_synthetic_boxprompt_cases
from mdbench.models import build_model
from mdbench.models.efficientvit_sam import build_efficientvit_sam
from mdbench.models.litemedsam import preprocess_image
from mdbench.papers.daft import training
from mdbench.papers.daft.cases import read_cases
from mdbench.papers.daft.training import BankBatches, Plateau, PromptBank, PromptSamples, Speed

SMALL = dict(backbone="efficientvit_b0", depths=None, neck_width=32, neck_depth=1, neck_block="mbconv")


def _case_2d(name: str = "2DBox_US_a.npz") -> dict:
    """A 128x64 (H, W) image with two objects: enlarged 2x to 256 high, padded on the right."""
    gts = np.zeros((128, 64), np.uint16)
    gts[10:30, 5:25] = 1
    gts[80:120, 30:60] = 2
    imgs = np.random.default_rng(1).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    return {"imgs": imgs, "gts": gts, "dims": 2, "name": name, "modality": "US"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[dict]:
    """One 2D case of two objects and one synthetic volume (two labels over several slices)."""
    folder = tmp_path_factory.mktemp("daft_bank")
    paths = write_synthetic_boxprompt_cases(folder, 1, kinds=("3DBox_MR",), volume_shape=(8, 48, 48))
    volumes, _ = read_cases(paths)
    return [_case_2d(), *volumes]


def _stacked(samples: PromptSamples) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(parts) for parts in zip(*(samples[i] for i in range(len(samples))), strict=True))


@pytest.mark.parametrize("slices,max_slices", [("random", None), ("all", 3)])
def test_bank_fixed_items_are_the_per_sample_items(cases, slices, max_slices):
    samples = PromptSamples(cases, slices, augment=False, seed=3, max_slices=max_slices)
    bank = PromptBank(cases, slices, seed=3, max_slices=max_slices)
    assert len(bank) == len(samples)
    for ours, theirs in zip(bank.fixed(torch.arange(len(bank))), _stacked(samples), strict=True):
        assert torch.equal(ours, theirs)
    # validation batches: the fixed items in order, the last batch short
    batches = list(BankBatches(bank, batch_size=2))
    assert len(batches) == len(BankBatches(bank, 2)) == -(-len(bank) // 2)
    assert torch.equal(torch.cat([b[2] for b in batches]), _stacked(samples)[2])


def _draws(samples: PromptSamples) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every (image, mask) an augmented item of ``samples`` can be, before the box jitter: each candidate slice, each
    of its objects, each of the four flips."""
    out: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for index, (case_index, candidates) in enumerate(samples.items):
        case, out[index] = samples.cases[case_index], []
        for z in candidates:
            image = preprocess_image(case["imgs"] if z is None else case["imgs"][z])[0]
            labels = training._resized_labels(case["gts"] if z is None else case["gts"][z])
            for label, hflip, vflip in itertools.product(training._objects(labels), (False, True), (False, True)):
                x, mask = image, (labels == label)[None].float()
                for flip, dim in ((hflip, 2), (vflip, 1)):
                    x, mask = (x.flip(dim), mask.flip(dim)) if flip else (x, mask)
                out[index].append((x, mask))
    return out


def test_bank_samples_are_draws_of_the_per_sample_path(cases):
    samples = PromptSamples(cases, "random", augment=True)
    possible = _draws(samples)
    bank = PromptBank(cases, "random")
    generator = torch.Generator().manual_seed(0)
    drawn = {index: set() for index in range(len(bank))}
    for _ in range(40):
        index = torch.arange(len(bank))
        images, masks, boxes = bank.sample(index, generator)
        assert images.shape == (len(bank), 3, 256, 256) and masks.shape == (len(bank), 1, 256, 256)
        for i, (image, mask, box) in enumerate(zip(images, masks, boxes, strict=True)):
            # the same image and object mask as some draw of PromptSamples' item i
            which = [k for k, (x, m) in enumerate(possible[i]) if torch.equal(x, image) and torch.equal(m, mask)]
            assert which, f"item {i}: no per-sample draw gives this image and mask"
            drawn[i].add(which[0])
            # and its box: the mask's tight box with each side moved out by 0..5 px, clipped to the image
            ys, xs = torch.nonzero(mask[0], as_tuple=True)
            tight = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
            out = torch.cat([tight[:2] - box[:2], box[2:] - tight[2:]])
            assert ((out >= 0) & (out <= training.BBOX_SHIFT)).all()
            assert (box[:2] >= 0).all() and (box[2:] <= 255).all()
    assert len(drawn[0]) == 8  # the 2D item: both objects under all four flips
    assert len(drawn[1]) > 8  # the volume: several slices and objects


def test_bank_training_batches_draw_every_item_once_an_epoch_and_drop_a_short_last_batch(cases):
    bank = PromptBank(cases * 3, "random")  # 6 items
    loader = BankBatches(bank, batch_size=4, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert len(loader) == 1 and [len(b[0]) for b in loader] == [4]
    loader = BankBatches(bank, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert [len(b[0]) for b in loader] == [3, 3]
    with pytest.raises(ValueError, match="batch_size"):
        BankBatches(bank, batch_size=0)


def test_plateau_counts_an_improvement_relative_to_the_best_loss():
    plateau = Plateau(patience=2, min_delta=0.1)
    assert plateau.improved(1.0, None) and not plateau.improved(float("nan"), None)
    assert not plateau.improved(0.95, 1.0)  # 5 % lower: flat
    assert plateau.improved(0.89, 1.0) and plateau.improved(0.0089, 0.01)  # 11 % lower, whatever the scale
    with pytest.raises(ValueError, match="fraction"):
        Plateau(min_delta=1.0)
    with pytest.raises(ValueError, match="mode"):
        Plateau(mode="max")


def _kd_problem(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Training and held-out images with the embeddings of a fixed random "teacher" (fast, like the KD test)."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Conv2d(3, 256, 4, stride=4), nn.Tanh()).eval()
    images, held_out = torch.rand(6, 3, 256, 256), torch.rand(3, 3, 256, 256)
    return images, training.embed_images(teacher, images), held_out, training.embed_images(teacher, held_out)


def _student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 256, 4, stride=4))


def test_kd_stops_when_the_held_out_embedding_loss_flattens_and_keeps_the_best_epoch():
    images, targets, held_out, held_out_targets = _kd_problem()
    student = _student()
    # lr 1e-7: the held-out loss barely moves, less than 1 % an epoch: flat after the first epoch
    flat = training.distill_encoder(student, images, targets, epochs=20, lr=1e-7, batch_size=2, val_images=held_out,
                                    val_targets=held_out_targets, patience=3, min_delta=0.01)
    assert flat.stop_reason == "early_stopping" and len(flat.epochs) == 4 and flat.best_epoch == 1
    assert all("val_loss" in epoch for epoch in flat.epochs)
    best = flat.epochs[0]["val_loss"]
    assert training.embedding_mse(student, held_out, held_out_targets).mean() == pytest.approx(best, rel=1e-5)
    # a loss still falling by more than 1 % an epoch runs every epoch
    falling = training.distill_encoder(_student(), images, targets, epochs=4, lr=3e-3, batch_size=2,
                                       val_images=held_out, val_targets=held_out_targets, patience=1, min_delta=0.01)
    losses = [epoch["val_loss"] for epoch in falling.epochs]
    assert falling.stop_reason == "epochs" and all(b < 0.99 * a for a, b in itertools.pairwise(losses))
    with pytest.raises(ValueError, match="go together"):
        training.distill_encoder(_student(), images, targets, epochs=1, val_images=held_out)


def test_kd_with_the_data_on_the_device_trains_as_the_default_path():
    images, targets, _, _ = _kd_problem()
    default, resident = _student(), _student()
    a = training.distill_encoder(default, images, targets, epochs=2, lr=1e-3, batch_size=4, seed=5)
    b = training.distill_encoder(resident, images, targets, epochs=2, lr=1e-3, batch_size=4, seed=5,
                                 speed=Speed(on_device=True, amp=True, channels_last=True, compile=True))  # CPU: as is
    assert [e["train_loss"] for e in a.epochs] == [e["train_loss"] for e in b.epochs]
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(), resident.parameters(), strict=True))


def test_finetuning_from_the_prompt_bank_trains_and_validates(cases):
    torch.manual_seed(0)
    student = build_efficientvit_sam(build_model("litemedsam"), **SMALL)
    prompt_encoder = {k: v.clone() for k, v in student.prompt_encoder.state_dict().items()}
    history = training.finetune(student, cases, cases[:1], epochs=2, lr=1e-4, batch_size=2, seed=0,
                                speed=Speed(on_device=True))
    assert len(history.epochs) == 2 and {"train_loss", "val_loss", "train_dice"} <= set(history.epochs[0])
    assert all(torch.equal(v, student.prompt_encoder.state_dict()[k]) for k, v in prompt_encoder.items())
    assert not student.training


def test_curves_frame_puts_kd_first_and_plot_curves_draws_one_panel_per_stage():
    from mdbench.papers.daft import experiment as daft

    def run(stage: str, seed: int, val: bool) -> pd.DataFrame:
        frame = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.5], "lr": 1e-4, "seconds": 1.0})
        frame = frame.assign(val_loss=[2.5, 2.0, 2.2]) if val else frame
        return frame.assign(seed=seed, stage=stage, kept=frame.epoch == (2 if val else 3))

    by_seed = {seed: daft.Lineage({}, [run("general FT", seed, True), run("DAFT 3D", seed, False),
                                       run("KD", seed, True)], pd.DataFrame()) for seed in (0, 1)}
    curves = daft.Lineages(by_seed, {}).curves_frame()
    assert list(dict.fromkeys(curves.stage)) == ["KD", "general FT", "DAFT 3D"]
    assert list(curves.columns[:6]) == ["stage", "seed", "epoch", "train_loss", "val_loss", "kept"]
    assert curves[curves.kept].groupby("stage", sort=False).epoch.first().to_dict() == {
        "KD": 2, "general FT": 2, "DAFT 3D": 3}
    fig = daft.plot_curves(curves)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["KD", "general FT", "DAFT 3D"]

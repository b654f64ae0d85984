"""Med-Tuning on CUDA with mixed precision against the CPU: slice-wise training of the Med-Adapter row and a PEFT
row, evaluation (Dice, HD95, predicted label maps) and the training-memory measurement."""
from __future__ import annotations

import pytest
import torch
from gpu_compare import MARKS, assert_close, assert_same, assert_scores_close
from torch.utils.data import DataLoader, TensorDataset

from mdbench import train
from mdbench.papers.med_tuning import experiment as mt

pytestmark = MARKS
TINY = {"patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 4}  # the smoke profile's backbone


def _setup(device: str) -> mt.Config:
    return mt.Config(backbone="timm:vit_tiny_patch16_224", backbone_kwargs=TINY, pretrained=False, image_size=32,
                     num_slices=8, decoder_channels=32, epochs=3, batch_size=2, device=device, amp=device == "cuda")


@pytest.mark.parametrize("row", ["med_tuning", "lora"])
def test_row_trains_and_scores_alike_on_cuda(row):
    volumes = mt.Volumes.concat([mt.load_volumes("synthetic", "train", 6, _setup("cpu")),
                                 mt.load_volumes("synthetic", "test", 3, _setup("cpu"))])
    test_set = volumes.parts()["test"]
    cpu = mt.run(row, _setup("cpu"), volumes, [0])
    gpu = mt.run(row, _setup("cuda"), volumes, [0])
    assert gpu.memory_method == "cuda_max_memory_allocated" and gpu.values["train_memory_mb"][0] > 0
    assert gpu.values["tuned_params_m"] == cpu.values["tuned_params_m"]
    assert gpu.example_pred.dtype == cpu.example_pred.dtype == torch.uint8
    assert gpu.example_pred.shape == cpu.example_pred.shape == test_set.labels[0].shape
    agreement = (gpu.example_pred == cpu.example_pred).float().mean().item()
    print(f"med_tuning {row}: {agreement:.4f} of the voxels labelled alike")
    # garbage agrees on about a third of the voxels; a few short epochs leave near-ties that bf16 moves
    assert agreement > 0.9, f"CUDA and CPU label maps agree on {agreement:.3f} of the voxels only"
    dice = [k for k in cpu.values if k.startswith("dice")]
    # Adam's early steps move weights by about lr whatever their gradient's size; bf16 flips some of them, so the
    # trained models differ by more than their kernels do (see the single-model test below for those)
    assert_scores_close({k: gpu.values[k][0] for k in dice}, {k: cpu.values[k][0] for k in dice}, 0.5,
                        100 * (1 - agreement), f"med_tuning {row}")
    assert_close(gpu.values["hd95"], cpu.values["hd95"], 0.25, f"med_tuning {row} hd95")


def test_evaluate_returns_label_maps_and_scores_them_alike_on_cuda():
    setup = _setup("cpu")
    volumes = mt.load_volumes("synthetic", "test", 4, setup)
    torch.manual_seed(0)
    model = mt.build_row_model("med_tuning", setup)
    cpu, gpu = mt.evaluate(model, volumes, "cpu"), mt.evaluate(model, volumes, "cuda")
    loader = DataLoader(TensorDataset(volumes.images, volumes.labels), batch_size=2)
    _, target = train.predict(model, loader, "cuda", fn=lambda m, b: (m(b[0]).argmax(dim=1).byte(), b[1]))
    assert_same(target, volumes.labels, "target label maps (evaluate's path)")
    assert gpu["pred"].device.type == "cpu" and gpu["pred"].dtype == cpu["pred"].dtype == torch.uint8
    agreement = (gpu["pred"] == cpu["pred"]).float().mean().item()
    print(f"med_tuning evaluate: {agreement:.4f} of the voxels labelled alike")
    assert agreement > 0.99, f"one model's label maps agree on {agreement:.3f} of the voxels only (TF32 near-ties)"
    assert_scores_close({k: v for k, v in gpu.items() if k.startswith("dice")},
                        {k: v for k, v in cpu.items() if k.startswith("dice")}, 0.01, 100 * (1 - agreement),
                        "med_tuning evaluate")


def test_cross_validation_scores_every_volume_once_on_cuda_as_on_the_cpu():
    """The gpu profile's protocol (2 folds, volumes resident on the device, batches indexed there) on CUDA."""
    setups = {device: mt.Config(**{**_setup(device).as_dict(), "dataset": "synthetic", "folds": 2, "n_volumes": 6})
              for device in ("cpu", "cuda")}
    volumes = mt.load_data(setups["cpu"])
    cpu, gpu = (mt.run("med_tuning", setups[d], volumes, [0]) for d in ("cpu", "cuda"))
    for result in (cpu, gpu):
        dice = result.per_volume[result.per_volume["metric"] == "dice_mean"]
        assert sorted(dice["unit"]) == sorted(volumes.ids)  # each volume once, by the fold that held it out
    assert gpu.curves[["fold", "epoch"]].equals(cpu.curves[["fold", "epoch"]])
    assert_close(gpu.values["dice_mean"], cpu.values["dice_mean"], 0.5, "med_tuning 2-fold dice_mean")

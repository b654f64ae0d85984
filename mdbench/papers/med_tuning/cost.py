"""What a Med-Tuning run will cost, before it runs: FLOPs of one training step and one scoring pass per row and
volume (PyTorch's ``FlopCounterMode`` on the meta device: shapes only, nothing computed), times the steps the run's
protocol takes, at a stated throughput.

The throughput is an assumption, calibrated on a whole earlier run rather than on a kernel peak: the gpu profile of
before cross-validation (volumes resampled to 32 × 64 × 64, decoder width 128, 90 training and 20 test volumes,
batch 4, 10 epochs, Table 1 over 3 seeds and 5 ablation rows over 1) counts 22.8 PFLOP by :func:`step_flops` and
took about 8 minutes on one H200 in all (model building, scoring and notebook included): 47.6 TFLOP/s. The estimate
assumes a little less, :data:`ASSUMED_TFLOPS`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from mdbench.models.slicewise import MedAdapterConfig
from mdbench.papers.med_tuning.experiment import (
    TABLE1_ROWS,
    Config,
    Volumes,
    ablation_adapters,
    build_row_model,
    cv_folds,
    dice_loss,
)

ASSUMED_TFLOPS = 45.0  # effective TFLOP/s of a whole run on one H200, bf16 autocast (module docstring)

__all__ = ["ASSUMED_TFLOPS", "estimate", "step_flops"]


def step_flops(row: str, cfg: Config, adapter: MedAdapterConfig | None = None) -> tuple[int, int]:
    """``(train, score)``: FLOPs of one training step on one (T, S, S) volume of ``cfg`` (forward, loss and the
    backward that the row's trainable set needs) and of one forward pass without gradients. Counted by
    ``FlopCounterMode`` (matrix products and convolutions, 2 FLOPs a multiply-add; FFTs, norms and activations are
    not counted) on the meta device, without loading pretrained weights (they change no shape). On the meta device
    attention is counted as its two matrix products, as FlopCounterMode counts CUDA's fused attention kernels (the
    CPU's fused kernel it does not count)."""
    model = build_row_model(row, dataclasses.replace(cfg, pretrained=False), adapter).to("meta")
    volume = torch.zeros(1, 1, cfg.num_slices, cfg.image_size, cfg.image_size, device="meta")
    label = torch.zeros(1, 1, cfg.num_slices, cfg.image_size, cfg.image_size, dtype=torch.long, device="meta")
    train_counter, score_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    model.train()
    with train_counter:
        dice_loss()(model(volume), label).backward()
    model.eval()
    with score_counter, torch.no_grad():
        model(volume)
    return train_counter.get_total_flops(), score_counter.get_total_flops()


def estimate(cfg: Config, volumes: Volumes, tflops: float = ASSUMED_TFLOPS) -> pd.DataFrame:
    """The run's cost per table row: one line per (table, row) with ``runs`` (seeds × folds), ``train_volumes`` and
    ``test_volumes`` per run (the first seed's folds), ``tflop_step`` (one training step on one volume),
    ``pflop`` (every run's training epochs and scoring) and ``minutes`` at ``tflops``. Table 2 leaves out
    Med-Tuning when its seeds are among Table 1's, as the notebook reuses those runs."""
    folds = cv_folds(volumes, cfg.folds, cfg.seeds[0])
    n_train = float(np.mean([len(train) for train, _ in folds]))
    n_test = float(np.mean([len(test) for _, test in folds]))
    plan: list[tuple[str, str, MedAdapterConfig | None, int]] = [("table1", row, None, len(cfg.seeds))
                                                                  for row in TABLE1_ROWS]
    reused = set(cfg.ablation_seeds) <= set(cfg.seeds)
    plan += [("table2", row, adapter, len(cfg.ablation_seeds))
             for row, adapter in ablation_adapters(cfg.ablation_ratios, cfg.adapter_ratio).items()
             if not (reused and row == "med_tuning")]
    lines = []
    for table, row, adapter, seeds in plan:
        train, score = step_flops(row, cfg, adapter)
        runs = seeds * len(folds)
        flop = runs * (train * n_train * cfg.epochs + score * n_test)
        lines.append({"table": table, "row": row, "runs": runs, "train_volumes": n_train, "test_volumes": n_test,
                      "tflop_step": train / 1e12, "pflop": flop / 1e15, "minutes": flop / (tflops * 1e12) / 60})
    return pd.DataFrame(lines)

"""What an EFCM run will cost on a GPU, before it runs: FLOPs per stage (``mdbench.efficiency.count_flops`` of the
teacher, the students and a CLAM-SB head, one input each) times how often the protocol runs it (folds, seeds,
epochs, the bags' sizes), turned into seconds at stated rates.

A stage takes ``max(FLOPs / rate, steps x step_ms)``: either the GPU computes, or it waits for the host to launch
the next step's kernels, as the small MIL steps do (a CLAM step is a few hundred small kernels whatever its batch).
A compute-bound stage is counted ``busy`` of the time in GPU utilisation, a launch-bound one ``launch_bound_busy``.

The rates are assumptions, chosen on the safe side until a gpu run measures them: the teacher at 0.8 x the best
row of ``benchmarks/teacher_throughput.py`` on an H100 (868 inputs/s compiled, batch 64), plus one compilation;
the students' training at 20 TFLOP/s (2 % of an H200's dense bf16 peak: small convolutions and a 256-token
transformer block); 3-10 ms of kernel launches per MIL, ETC or distillation step.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from mdbench.efficiency import count_flops
from mdbench.models import build_model
from mdbench.papers.efcm.experiment import BagData, Config, steps_batch, students

__all__ = ["ASSUMED", "Rates", "estimate", "utilisation"]


@dataclass(frozen=True)
class Rates:
    """How fast each kind of stage runs on the GPU (module docstring)."""

    teacher_per_s: float = 690.0  # teacher inputs a second
    compile_s: float = 60.0  # one torch.compile of the teacher
    train_tflops: float = 20.0  # the students' training and encoding
    head_step_ms: float = 3.0  # one MIL-head step, launch-bound
    etc_step_ms: float = 10.0  # one ETC step's launches
    distill_step_ms: float = 4.0  # one stage-1 step's launches
    busy: float = 0.95  # GPU utilisation while compute-bound
    launch_bound_busy: float = 0.3  # ... and while launch-bound


ASSUMED = Rates()


def _gflops(model: nn.Module, x: torch.Tensor) -> float:
    return count_flops(model.eval(), (x,)).flops / 1e9


def estimate(cfg: Config, data: Mapping[str, BagData], teacher: nn.Module | None = None,
             rates: Rates = ASSUMED) -> pd.DataFrame:
    """The run's cost per stage: one line per stage with ``runs`` (trainings of it: seeds x folds, or teacher
    inputs), ``tflop``, ``seconds`` at ``rates`` and whether it is ``compute``- or ``launch``-bound.

    ``teacher``: the patch encoder whose features the run computes (default LiteMedSAM's image encoder at its
    256-px input); its cached features cost nothing. Training FLOPs are 3 x a forward pass (forward and backward).
    """
    rate = rates.train_tflops * 1e3  # GFLOP/s
    teacher = teacher or build_model("litemedsam_encoder")
    size = getattr(teacher, "input_size", None) or cfg.patch_size
    per_input = _gflops(teacher, torch.rand(1, 3, size, size))
    patch = torch.rand(1, 3, cfg.patch_size, cfg.patch_size)
    student = {v: _gflops(s, patch) for v, s in students(cfg, 256).items()}
    head = _gflops(build_model("clam_sb", in_dim=256, hidden=cfg.head_hidden), torch.randn(16, 256)) / 16  # an instance
    lines = []

    def stage(name: str, runs: int, gflops: float, steps: int, step_ms: float) -> None:
        compute, launches = gflops / rate, steps * step_ms / 1e3
        lines.append({"stage": name, "runs": runs, "tflop": gflops / 1e3, "seconds": max(compute, launches),
                      "bound": "compute" if compute >= launches else "launch"})

    patches = sum(sum(len(b[0]) for b in d.bags) for d in data.values() if d.kind == "patches")
    lines.append({"stage": "teacher features (once, cached)", "runs": patches, "tflop": patches * per_input / 1e3,
                  "seconds": patches / rates.teacher_per_s + (rates.compile_s if cfg.teacher_compile else 0.0),
                  "bound": "compute"})
    runs = len(cfg.seeds) * cfg.folds
    for name, d in data.items():
        sizes = np.array([len(b[0]) for b in d.bags])
        rest = len(sizes) * (cfg.folds - 1) / cfg.folds  # the bags outside a test fold: train and val
        n_train = round(rest * (1 - 1 / max(2, cfg.folds - 1)))
        n_val, mean = round(rest) - n_train, sizes.mean()
        bag_batch = steps_batch(cfg.bag_batch, n_train, cfg.min_steps_per_epoch)
        per_epoch = math.ceil(n_train / bag_batch) + math.ceil(n_val / bag_batch)  # train_mil validates at it too
        heads = len(cfg.heads) + (3 if d.kind == "patches" else 0)  # the MIL-head table and the 3 Retrain heads
        stage(f"{name}: {heads} MIL heads x {cfg.head_epochs} epochs", runs,
              runs * heads * cfg.head_epochs * (3 * n_train + n_val) * mean * head,
              runs * heads * cfg.head_epochs * per_epoch, rates.head_step_ms)
        if d.kind != "patches":
            continue
        distill_batch = steps_batch(cfg.distill_batch, int(n_train * mean), cfg.min_steps_per_epoch)
        steps = cfg.distill_epochs * max(1, int(n_train * mean // distill_batch))
        stage(f"{name}: stage 1, 3 students x {cfg.distill_epochs} epochs", runs,
              runs * steps * distill_batch * 3 * sum(student.values()), runs * 3 * steps, rates.distill_step_ms)
        stage(f"{name}: the students' features for Retrain", runs, runs * sizes.sum() * sum(student.values()),
              runs * 3 * math.ceil(len(sizes) / cfg.bag_batch), rates.head_step_ms)
        with_grad = np.minimum(sizes, cfg.etc_max_patches).mean()
        per_bag = 3 * with_grad + (mean - with_grad)  # forward and backward where gradients flow, forward elsewhere
        stage(f"{name}: ETC, 3 runs x {cfg.etc_epochs} epochs", runs,
              runs * 3 * cfg.etc_epochs * (n_train * per_bag + n_val * mean) * student["fpd_ts"],
              runs * 3 * cfg.etc_epochs * per_epoch, rates.etc_step_ms)
    return pd.DataFrame(lines)


def utilisation(frame: pd.DataFrame, rates: Rates = ASSUMED) -> float:
    """The GPU utilisation (%) an :func:`estimate` implies, weighting each stage by its seconds."""
    busy = np.where(frame["bound"] == "compute", rates.busy, rates.launch_bound_busy)
    return float(100 * (frame["seconds"] * busy).sum() / frame["seconds"].sum())

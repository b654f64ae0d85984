"""What RD's grid costs before it runs: FLOPs per optimizer step of each row, times steps and runs, as minutes.

:func:`forward_flops` counts the forward FLOPs per image of the FM, each student and the reprogrammer with
:func:`mdbench.efficiency.count_flops`; :func:`plan` multiplies them out over :func:`experiment.run`'s grid for a
:class:`~experiment.Config` and converts them to seconds with a :class:`Throughput`, whose rates are assumptions
stated here, not measurements. The rule of thumb behind the FLOPs of a step (Kaplan et al. 2020):

- a network that trains costs 3x its forward pass (forward, backward to the activations, backward to the weights);
- a frozen network that gradients pass through costs 2x (forward and backward to the activations): RD's FM under
  an image-space reprogrammer, and LoRA's and VPT's FM (their adapters' own weight gradients are left out);
- a frozen network whose outputs are cached costs nothing per step: RD's FM under a feature-space reprogrammer, and
  the FM of the linear probe, FitNet, RKD and RD without reprogramming. Its one forward pass over every image
  (``fm_features``) and each run's scoring passes (precise BatchNorm over the training images, the test images, a
  KD teacher's logits on the training images) count once, at the forward rate.

A step takes ``max(FLOPs / rate, floor)``: the floor is what launching a small network's few hundred kernels
costs in eager PyTorch when the GPU has less than that to do. :func:`experiment.run` records each run's ``steps``
and training ``seconds``, so a real run checks these assumptions.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, cast

import pandas as pd
import torch
from torch import nn

from mdbench.efficiency import count_flops
from mdbench.models import build_model
from mdbench.models.reprogramming import FeatureReprogrammer, FrozenFM, InputReprogrammer, ProjectedStudent
from mdbench.papers.rd.experiment import (
    CLAIM_METHODS,
    FM_METHODS,
    STUDENT_METHODS,
    Config,
    fraction_label,
    run_steps,
)

FM_TRAINED = ("fm_full_ft",)          # the FM's weights train
FM_PASSED = ("fm_lora", "fm_vpt")     # gradients pass through the frozen FM


@dataclass(frozen=True)
class Throughput:
    """Assumed rates of one GPU (defaults: one H200, bf16 autocast, channels-last, batch 32).

    - ``fm_tflops``: LiteMedSAM's encoder at 256x256. 17 TFLOP/s is what the last gpu run's grid cell reached (about
      13 PFLOP of FM work by this model in 12.9 min: LiteMedSAM image-space RD, full FT, LoRA and VPT at 30 steps).
      An H100 ran its forward pass alone at 34 TFLOP/s eager, batch 64 (results/efcm/benchmarks).
    - ``student_tflops``: ResNet-18 / ViT-Tiny training at 224 px: about 3,700 ResNet-18 images/s, taken low
      (published A100/H100 figures are 1.5-2x that) because batches of 32 leave the GPU part of each step idle.
    - ``step_floor_ms``: the least an eager training step of a student takes whatever its FLOPs (hundreds of
      kernel launches, the optimizer, the losses); ``head_step_ms`` that of a linear head on cached features.
    - ``run_overhead_s``: building, copying and moving a model, per run.
    """

    fm_tflops: float = 17.0
    student_tflops: float = 40.0
    step_floor_ms: float = 6.0
    head_step_ms: float = 1.0
    run_overhead_s: float = 0.3


class DataSize(NamedTuple):
    """What :func:`plan` needs of a dataset: its training and test images and its classes."""

    train: int
    test: int
    classes: int


def forward_flops(cfg: Config, fm: FrozenFM, students: list[str]) -> dict[str, float]:
    """Forward FLOPs of one image at ``cfg.image_size`` through ``fm`` (key ``"fm"``, at whatever size it resizes
    to), each of ``students`` with its projector (key: its name) and RD's reprogrammer in ``cfg.phi_space``
    (``"phi"``), counted by :func:`mdbench.efficiency.count_flops`."""
    image = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    flops = {"fm": float(count_flops(fm, image).flops)}
    for name in students:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no local weights: random init, which costs the same
            # build_model returns nn.Module: the registry's "projected_student" builds a ProjectedStudent
            student = cast(ProjectedStudent, build_model("projected_student", backbone=name,
                                                         embed_dim=fm.feature_dim, image_size=cfg.image_size,
                                                         pretrained=False, projector=cfg.projector))
        flops[name] = float(count_flops(student, image).flops)
    phi: nn.Module
    if cfg.phi_space == "image":
        phi, phi_input = InputReprogrammer(3, cfg.reprogrammer_hidden), image
    else:
        phi, phi_input = FeatureReprogrammer(fm.feature_dim, cfg.reprogrammer_hidden), torch.rand(1, fm.feature_dim)
    flops["phi"] = float(count_flops(phi, phi_input).flops)
    return flops


def _student_step(method: str, student: str, flops: dict[str, float], cfg: Config) -> tuple[float, float]:
    """(student FLOPs, FM FLOPs) of one image in one training step of a student method."""
    own = 3 * flops[student]
    if method in ("rd", "rd_no_cka"):
        own += 3 * flops["phi"]
        if cfg.phi_space == "image":
            return own, 2 * flops["fm"]
    return own, 0.0


def _fm_step(method: str, flops: dict[str, float]) -> float:
    """FM FLOPs of one image in one training step of an FM method (the linear probe's head: none)."""
    return 3 * flops["fm"] if method in FM_TRAINED else 2 * flops["fm"] if method in FM_PASSED else 0.0


def plan(cfg: Config, sizes: dict[str, DataSize], methods: list[str], flops: dict[str, float],
         rates: Throughput = Throughput()) -> pd.DataFrame:
    """The grid :func:`experiment.run` trains for ``cfg`` on datasets of ``sizes``, with its cost.

    Args:
        cfg: the run's config (seeds, fractions, students and claim students, steps and epochs, batch size).
        sizes: per dataset of ``cfg.datasets``, its sizes (before the label fraction).
        methods: the methods that run (FM and student methods, as :func:`experiment.run` takes them).
        flops: :func:`forward_flops` of the FM, every student and ``"phi"``.
        rates: the assumed GPU.

    Returns:
        One row per (dataset label, student, method), plus one ``fm_features`` row per dataset: ``runs``,
        ``steps`` (per run), ``step_tflop`` and ``step_ms`` (one optimizer step of a batch), ``tflop`` (training
        and scoring, all runs) and ``minutes`` (by ``rates``). Seeds share a row: each trains the same steps.
    """
    floor, runs = rates.step_floor_ms / 1e3, len(cfg.seeds)
    fm_rate, student_rate = rates.fm_tflops * 1e12, rates.student_tflops * 1e12
    teacher = next((m for m in ("fm_full_ft", "fm_linear_probe") if m in methods), None)
    lines = []

    def add(label: str, student: str, method: str, steps: int, step_flops: tuple[float, float],
            eval_flops: tuple[float, float], step_floor: float) -> None:
        """``step_flops`` and ``eval_flops``: (student-rate, FM-rate) FLOPs of one step and of one run's scoring."""
        step_s = max(step_flops[0] / student_rate + step_flops[1] / fm_rate, step_floor)
        run_s = steps * step_s + eval_flops[0] / student_rate + eval_flops[1] / fm_rate + rates.run_overhead_s
        lines.append({"dataset": label, "student": student, "method": method, "runs": runs, "steps": steps,
                      "step_tflop": sum(step_flops) / 1e12, "step_ms": 1e3 * step_s,
                      "tflop": runs * (steps * sum(step_flops) + sum(eval_flops)) / 1e12,
                      "minutes": runs * run_s / 60})

    for name in cfg.datasets:
        size = sizes[name]
        lines.append({"dataset": name, "student": "—", "method": "fm_features", "runs": 1, "steps": 0,
                      "step_tflop": 0.0, "step_ms": 0.0, "tflop": (size.train + size.test) * flops["fm"] / 1e12,
                      "minutes": (size.train + size.test) * flops["fm"] / fm_rate / 60})
        for fraction in cfg.fractions:
            n_train = max(size.classes, round(fraction * size.train))  # as label_subset draws them
            label, steps, batch = fraction_label(name, fraction), run_steps(n_train, cfg), min(cfg.batch_size, n_train)
            for method in (m for m in FM_METHODS if m in methods):
                scored = size.test + n_train * ((method == "fm_full_ft") + (method == teacher))  # BN, KD logits
                fm_scoring = 0.0 if method == "fm_linear_probe" else scored * flops["fm"]
                add(label, "—", method, steps, (0.0, batch * _fm_step(method, flops)), (0.0, fm_scoring),
                    rates.head_step_ms / 1e3 if method == "fm_linear_probe" else floor)
            for student in cfg.students_of(name):
                for method in (m for m in STUDENT_METHODS if m in methods):
                    if student not in cfg.students and method not in CLAIM_METHODS:
                        continue
                    own, fm = _student_step(method, student, flops, cfg)
                    scoring = (n_train + size.test) * flops[student]  # precise BatchNorm, test
                    fm_scoring = size.test * flops["fm"] if method == "rd" and cfg.phi_space == "image" else 0.0
                    add(label, student, method, steps, (batch * own, batch * fm), (scoring, fm_scoring), floor)
    return pd.DataFrame(lines)


def summary(grid: pd.DataFrame) -> str:
    """One line: the grid's runs, optimizer steps, PFLOP and minutes."""
    trained = grid[grid.method != "fm_features"]
    return (f"{int(trained.runs.sum())} runs, {int((trained.runs * trained.steps).sum()):,} optimizer steps, "
            f"{grid.tflop.sum() / 1e3:.1f} PFLOP: about {math.ceil(grid.minutes.sum())} min at the assumed rates")


def compare(grid: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`plan`'s ``grid`` against what :func:`experiment.run` measured (``runs``), per student ("—": the FM
    methods): the optimizer ``steps``, the ``minutes`` they took and the ``planned_minutes`` (training steps only,
    no scoring or overheads), ``ms_per_step`` and the ``tflops`` they reached."""
    trained = runs[runs.steps > 0].merge(grid[["dataset", "student", "method", "step_tflop", "step_ms"]],
                                         on=["dataset", "student", "method"], how="left", validate="many_to_one")
    by = trained.assign(tflop=trained.steps * trained.step_tflop,
                        planned_s=trained.steps * trained.step_ms / 1e3).groupby("student", sort=False)
    seconds, steps = by.seconds.sum(), by.steps.sum()
    return pd.DataFrame({"steps": steps, "minutes": seconds / 60, "planned_minutes": by.planned_s.sum() / 60,
                         "ms_per_step": 1e3 * seconds / steps, "tflops": by.tflop.sum() / seconds})

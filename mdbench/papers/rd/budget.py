"""What RD's grid costs before it runs: FLOPs per optimizer step of each row, times steps and runs, as minutes.

:func:`forward_flops` counts the forward FLOPs per image of the FM, each student and the reprogrammer with
:func:`mdbench.efficiency.count_flops`; :func:`plan` multiplies them out over :func:`experiment.run`'s grid for a
:class:`~experiment.Config` and converts them to seconds with a :class:`Throughput`, whose rates say which are
measured (and where) and which are assumptions. The rule of thumb behind the FLOPs of a step (Kaplan et al. 2020):

- a network that trains costs 3x its forward pass (forward, backward to the activations, backward to the weights);
- a frozen network that gradients pass through costs 2x (forward and backward to the activations): RD's FM under
  an image-space reprogrammer, and LoRA's and VPT's FM (their adapters' own weight gradients are left out);
- a frozen network whose outputs are cached costs nothing per step: RD's FM under a feature-space reprogrammer, and
  the FM of the linear probe, FitNet, RKD and RD without reprogramming. Its one forward pass over every image
  (``fm_features``) and each run's scoring passes (precise BatchNorm over the training images, the test images, a
  KD teacher's logits on the training images) count once, at the forward rate.

Time: a step takes ``max(FLOPs / rate, floor)``, the GPU's work or the host's, whichever is longer (the host queues
a step's kernels while the GPU runs the last one's; the floor is what launching a student's few hundred eager
kernels costs when the GPU has less than that to do). Each epoch adds ``epoch_overhead_ms`` (``train.fit`` reads
the epoch's losses back, which drains that queue, and snapshots the weights) and each run ``run_overhead_s``.
``compute_minutes`` is the part of the time the GPU works at the stated rates: its share of ``minutes`` estimates
the mean GPU utilisation. :func:`experiment.run` records each run's ``steps`` and training ``seconds``, and
:func:`compare` sets them against the plan, so a real run checks these rates.

``python -m mdbench.papers.rd.budget --profile gpu`` prints the plan of a profile's grid on the datasets under
``MDBENCH_DATA_DIR`` (their sizes only: no image is read but the FLOP counts' random ones).
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple, cast

import pandas as pd
import torch
from torch import nn

from mdbench.data.base import RealDataset
from mdbench.data.errors import DataNotFoundError
from mdbench.data.registry import load_dataset
from mdbench.efficiency import count_flops
from mdbench.models import build_model
from mdbench.models.reprogramming import (
    FeatureReprogrammer,
    FrozenFM,
    InputReprogrammer,
    ProjectedStudent,
    build_fm,
)
from mdbench.papers.rd.experiment import (
    CLAIM_METHODS,
    FM_METHODS,
    STUDENT_METHODS,
    Config,
    epoch_passes,
    fraction_label,
    run_steps,
    unavailable_methods,
)

FM_TRAINED = ("fm_full_ft",)          # the FM's weights train
FM_PASSED = ("fm_lora", "fm_vpt")     # gradients pass through the frozen FM


@dataclass(frozen=True)
class Throughput:
    """Rates of one GPU (defaults: one H200, bf16 autocast, channels-last, the data resident on it and batches
    drawn there, ``Config.resident_batches``). Measured where stated, else assumed:

    - ``fm_tflops`` (measured): LiteMedSAM's encoder at 256x256. 17 TFLOP/s is what an earlier gpu run's grid cell
      reached (about 13 PFLOP of FM work by this model in 12.9 min: LiteMedSAM image-space RD, full FT, LoRA and VPT
      at 30 steps). An H100 ran its forward pass alone at 34 TFLOP/s eager, batch 64 (results/efcm/benchmarks).
    - ``student_tflops`` (assumed): ResNet-18 / ViT-Tiny training at 224 px, about 3,700 ResNet-18 images/s, taken
      low: published A100 and H100 figures for ResNets under mixed precision are 1.5-2x that, at batches of 256.
    - ``step_floor_ms`` (assumed): the least an eager training step of a student takes whatever its FLOPs, what
      the host needs to launch it: ~450 PyTorch operations (forward, backward, the losses, the logs, fused AdamW)
      at some 30 us each; one number for every student (MobileNetV3's many small layers take more). Measured on
      the old path only: the last gpu run (batch 32, the host waiting for the GPU at every step and epoch) took
      about 25 s a run at 22 % mean GPU utilisation, at most ~55 ms a step on average over its 458 steps a run
      (every per-run and per-epoch cost included). ``head_step_ms`` (assumed) the same for a linear head.
    - ``epoch_overhead_ms`` (assumed): per epoch, reading its mean losses back (the GPU's queue drains: about one
      step's launch lost) and the weights' snapshot on the GPU.
    - ``run_overhead_s`` (assumed): building, copying and moving a model, cuDNN's first tuning of a shape, per run.
    """

    fm_tflops: float = 17.0
    student_tflops: float = 40.0
    step_floor_ms: float = 15.0
    head_step_ms: float = 1.0
    epoch_overhead_ms: float = 20.0
    run_overhead_s: float = 0.5


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
        rates: the GPU's rates.

    Returns:
        One row per (dataset label, student, method), plus one ``fm_features`` row per dataset: ``runs``,
        ``steps`` and ``epochs`` (per run), ``step_tflop`` and ``step_ms`` (one optimizer step of a batch),
        ``tflop`` (training and scoring, all runs), ``minutes`` (by ``rates``) and ``compute_minutes`` (the part of
        them the GPU computes: FLOPs over rates). Seeds share a row: each trains the same steps.
    """
    floor, runs = rates.step_floor_ms / 1e3, len(cfg.seeds)
    fm_rate, student_rate = rates.fm_tflops * 1e12, rates.student_tflops * 1e12
    teacher = next((m for m in ("fm_full_ft", "fm_linear_probe") if m in methods), None)
    lines = []

    def add(label: str, student: str, method: str, steps: int, epochs: int, step_flops: tuple[float, float],
            eval_flops: tuple[float, float], step_floor: float) -> None:
        """``step_flops`` and ``eval_flops``: (student-rate, FM-rate) FLOPs of one step and of one run's scoring."""
        step_compute_s = step_flops[0] / student_rate + step_flops[1] / fm_rate
        eval_s = eval_flops[0] / student_rate + eval_flops[1] / fm_rate
        step_s = max(step_compute_s, step_floor)
        run_s = steps * step_s + epochs * rates.epoch_overhead_ms / 1e3 + eval_s + rates.run_overhead_s
        lines.append({"dataset": label, "student": student, "method": method, "runs": runs, "steps": steps,
                      "epochs": epochs, "step_tflop": sum(step_flops) / 1e12, "step_ms": 1e3 * step_s,
                      "tflop": runs * (steps * sum(step_flops) + sum(eval_flops)) / 1e12,
                      "minutes": runs * run_s / 60, "compute_minutes": runs * (steps * step_compute_s + eval_s) / 60})

    for name in cfg.datasets:
        size = sizes[name]
        features_minutes = (size.train + size.test) * flops["fm"] / fm_rate / 60
        lines.append({"dataset": name, "student": "—", "method": "fm_features", "runs": 1, "steps": 0, "epochs": 0,
                      "step_tflop": 0.0, "step_ms": 0.0, "tflop": (size.train + size.test) * flops["fm"] / 1e12,
                      "minutes": features_minutes, "compute_minutes": features_minutes})
        for fraction in cfg.fractions:
            n_train = max(size.classes, round(fraction * size.train))  # as label_subset draws them
            label, steps, batch = fraction_label(name, fraction), run_steps(n_train, cfg), min(cfg.batch_size, n_train)
            # train.fit's epochs of whole passes in full batches, the last one cut short
            epochs = math.ceil(steps / (epoch_passes(n_train, cfg) * (n_train // batch)))
            for method in (m for m in FM_METHODS if m in methods):
                scored = size.test + n_train * ((method == "fm_full_ft") + (method == teacher))  # BN, KD logits
                fm_scoring = 0.0 if method == "fm_linear_probe" else scored * flops["fm"]
                add(label, "—", method, steps, epochs, (0.0, batch * _fm_step(method, flops)), (0.0, fm_scoring),
                    rates.head_step_ms / 1e3 if method == "fm_linear_probe" else floor)
            for student in cfg.students_of(name):
                for method in (m for m in STUDENT_METHODS if m in methods):
                    if student not in cfg.students and method not in CLAIM_METHODS:
                        continue
                    own, fm = _student_step(method, student, flops, cfg)
                    scoring = (n_train + size.test) * flops[student]  # precise BatchNorm, test
                    fm_scoring = size.test * flops["fm"] if method == "rd" and cfg.phi_space == "image" else 0.0
                    add(label, student, method, steps, epochs, (batch * own, batch * fm), (scoring, fm_scoring),
                        floor)
    return pd.DataFrame(lines)


def summary(grid: pd.DataFrame) -> str:
    """One line: the grid's runs, optimizer steps, PFLOP, minutes and the share of them the GPU computes (an
    estimate of its mean utilisation), all at the rates of the plan."""
    trained = grid[grid.method != "fm_features"]
    return (f"{int(trained.runs.sum())} runs, {int((trained.runs * trained.steps).sum()):,} optimizer steps, "
            f"{grid.tflop.sum() / 1e3:.1f} PFLOP: about {math.ceil(grid.minutes.sum())} min at the plan's rates, "
            f"the GPU computing {100 * grid.compute_minutes.sum() / grid.minutes.sum():.0f} % of it")


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


# ------------------------------------------------------------------------------------------------- command line
OPTIMISTIC = Throughput(student_tflops=80.0, step_floor_ms=8.0, epoch_overhead_ms=10.0)  # the printed upper range


def profile_config(profile: str) -> Config:
    """The :class:`~experiment.Config` that ``mdbench reproduce --paper rd --profile <profile>`` runs
    (:func:`mdbench.runner.profile_config`). Not for a profile that runs the notebook's own defaults (smoke): the
    notebook prints that plan itself."""
    from mdbench import runner

    if runner.load_profile(profile).notebook_defaults:
        raise ValueError(f"the {profile} profile runs the notebook's own defaults, which only the notebook knows: "
                         "its cell 'The grid at the gpu profile' prints that plan")
    return runner.profile_config("rd", profile, Config)


def data_sizes(cfg: Config) -> dict[str, DataSize]:
    """Per dataset of ``cfg``, its training and test images (after ``cfg.max_train``/``max_test``) and classes, from
    the registry's splits under ``cfg.data_dir`` (``MDBENCH_DATA_DIR``), without reading an image."""
    sizes = {}
    for name in cfg.datasets:
        if name == "synthetic":  # experiment.load_classification: max_train/max_test images, 2 classes
            if cfg.max_train is None or cfg.max_test is None:
                raise ValueError("the synthetic dataset needs max_train and max_test (its sizes)")
            sizes[name] = DataSize(cfg.max_train, cfg.max_test, 2)
            continue
        # the registry types its result as Dataset; every real dataset's loader is a RealDataset (classes)
        train, test = (cast(RealDataset, load_dataset(name, split=split, data_dir=cfg.data_dir,
                                                      image_size=cfg.image_size, channels=3))
                       for split in ("train", "test"))
        sizes[name] = DataSize(min(len(train), cfg.max_train or len(train)), min(len(test), cfg.max_test or len(test)),
                               len(train.classes))
    return sizes


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Print the plan of RD's grid at a profile (``--profile``, default gpu): the summary at the default rates and
    at :data:`OPTIMISTIC` ones, and the minutes per student and dataset label. Returns the plan at the default
    rates."""
    parser = argparse.ArgumentParser(prog="python -m mdbench.papers.rd.budget", description=main.__doc__)
    parser.add_argument("--profile", default="gpu", help="cpu | gpu (default gpu)")
    parser.add_argument("--data-dir", help="the folder that holds the datasets (default: MDBENCH_DATA_DIR)")
    args = parser.parse_args(argv)
    cfg = profile_config(args.profile)
    if args.data_dir:
        cfg = replace(cfg, data_dir=args.data_dir)
    try:
        sizes = data_sizes(cfg)
    except DataNotFoundError as err:
        parser.error(str(err))
    fm = FrozenFM(build_fm(cfg.fm, input_size=None if cfg.fm == "litemedsam" else cfg.image_size))
    methods = [m for m in cfg.methods if m not in unavailable_methods(cfg.methods, fm)]
    flops = forward_flops(cfg, fm, [*cfg.students, *cfg.claim_students])
    grid = plan(cfg, sizes, methods, flops)
    datasets = ", ".join(f"{name} ({size.train} train, {size.test} test)" for name, size in sizes.items())
    print(f"RD at the {args.profile} profile on {datasets}; batches of {cfg.batch_size}, lr {cfg.lr}, "
          f"{len(cfg.seeds)} seeds")
    print(f"at the default rates {Throughput()}:\n  {summary(grid)}")
    print(f"at optimistic rates {OPTIMISTIC}:\n  {summary(plan(cfg, sizes, methods, flops, OPTIMISTIC))}")
    print(grid.pivot_table(index="student", columns="dataset", values="minutes", aggfunc="sum", sort=False)
          .round(2).to_string())
    return grid


if __name__ == "__main__":
    main()

"""EFCM's Table 2: what extracting features and classifying one bag cost, the teacher and every student measured on
inputs of one size (:func:`cost_input_size`), so that a cost ratio says something about the models and not about
their inputs (in the pipeline the teacher sees each small tile upsampled to its 256x256 input, the student the tile
itself). :func:`table2_costs` measures, :func:`record_costs` makes the records.

A wall-clock metric (``ms_patch``, ``s_bag``, their GPU twins, ``patches_per_s``, ``tflops_achieved``) holds one
value per timed repeat (an array), its record their median and its per-sample outputs one line per repeat, so that a
claim on it pairs the repeats of two rows (:mod:`mdbench.verdicts`); the teacher and the students are timed in
shared rounds (:func:`mdbench.efficiency.measure_latencies`).
"""
from __future__ import annotations

import tempfile
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from mdbench import efficiency
from mdbench import samples as sample_outputs
from mdbench.models.clam import clam_sb
from mdbench.papers.efcm.experiment import Config, PatchEncoder, autocast, fast_teacher, students

__all__ = ["TABLE2_UNITS", "Costs", "cost_input_size", "measure_costs", "record_costs", "table2_costs", "throughput"]

# row -> metric -> a count (float) or a wall-clock time or rate (one value per timed repeat)
Costs = dict[str, dict[str, float | np.ndarray]]
_HEAD = "<MIL head>"  # the head's key among the timed calls, no encoder's name


def measure_costs(encoders: dict[str, nn.Module], head: nn.Module, input_size: int, bag_size: int, *,
                  repeats: int = 20, device: str = "cpu") -> Costs:
    """Table 2: what extracting features and classifying one bag costs, per encoder, every encoder on inputs of
    one size.

    Per input (batch of one (1, 3, input_size, input_size) image): deployed parameters in millions
    (``params_m``, encoder + head), ``gflops_patch`` (FlopCounterMode, 2 x MACs) and ``ms_patch`` (latency on
    ``device``, (repeats,) one per round). Per bag of ``bag_size`` inputs: ``gflops_bag`` = bag_size x
    gflops_patch + the head's FLOPs on (bag_size, D), and ``s_bag`` = bag_size x ms_patch + the head's latency
    of the same round, in seconds, (repeats,). The head and every encoder are timed in the same rounds. An encoder
    that would resize the input first (a :class:`PatchEncoder` of another ``input_size``) is refused: its cost
    would be another size's, not comparable.
    """
    resizing = [name for name, e in encoders.items() if getattr(e, "input_size", None) not in (None, input_size)]
    if resizing:
        raise ValueError(f"{resizing} resize every input to another size than {input_size}: their costs would not "
                         "be comparable; measure at their input size")
    patch = torch.rand(1, 3, input_size, input_size)
    in_dim = cast(int, head.in_dim)  # every MIL head keeps its input width as the int ``in_dim``
    bag = torch.randn(bag_size, in_dim)
    head_flops = efficiency.count_flops(head, (bag,)).flops
    head_params = efficiency.count_parameters(head).total
    calls = {_HEAD: (head, (bag,)), **{name: (encoder.to(device), (patch,)) for name, encoder in encoders.items()}}
    latency = efficiency.measure_latencies(calls, warmup=2, repeats=repeats, device=device)
    head_ms = np.asarray(latency[_HEAD].times_ms)
    rows: Costs = {}
    for name, encoder in encoders.items():
        flops = efficiency.count_flops(encoder, (patch,)).flops / 1e9
        ms = np.asarray(latency[name].times_ms)
        params = efficiency.count_parameters(encoder).total + head_params
        rows[name] = {"params_m": params / 1e6, "gflops_patch": flops, "ms_patch": ms,
                      "gflops_bag": bag_size * flops + head_flops / 1e9, "s_bag": (bag_size * ms + head_ms) / 1e3}
    return rows


def cost_input_size(teacher: PatchEncoder, patch_size: int) -> int:
    """The one input side at which Table 2 counts and times the teacher and every student: the teacher's native
    input where it has one (LiteMedSAM: 256, to which each tile is upsampled; the students are convolutional and
    run at any size, the teacher cannot run natively at the students' tile size), else ``patch_size``."""
    return teacher.input_size or patch_size


TABLE2_UNITS = {"params_m": "M", "gflops_patch": "GFLOPs", "gflops_bag": "GFLOPs", "ms_patch": "ms", "s_bag": "s",
                "ms_patch_gpu": "ms", "s_bag_gpu": "s", "parity_max_abs_diff": "", "patches_per_s": "patches/s",
                "tflops_achieved": "TFLOP/s"}


def table2_costs(teacher: PatchEncoder, teacher_dim: int, cfg: Config) -> Costs:
    """Table 2 at :func:`cost_input_size`, teacher and students alike: :func:`measure_costs` of the teacher and
    each student (with a CLAM-SB head) on the CPU; the FPD + TransScan student exported to every backend of
    :data:`mdbench.efficiency.BACKENDS` (``ms_patch`` and its ``parity_max_abs_diff`` against PyTorch); the
    teacher's feature throughput on ``cfg.device``, run as :func:`teacher_features` runs it
    (:func:`~mdbench.papers.efcm.experiment.fast_teacher`), and the compute rate it implies (inputs/s x counted
    FLOPs); on CUDA, the GPU latency of teacher and student (timed in shared rounds). Wall-clock metrics: one value
    per repeat (``cfg.latency_repeats``)."""
    size = cost_input_size(teacher, cfg.patch_size)
    head = clam_sb(teacher_dim, hidden=tuple(cfg.head_hidden))
    encoders = {"teacher": teacher, **{f"student_{v}": s.eval() for v, s in students(cfg, teacher_dim).items()}}
    costs = measure_costs(encoders, head, size, cfg.cost_bag_size, repeats=cfg.latency_repeats, device="cpu")
    patch = torch.rand(2, 3, size, size)
    workdir = tempfile.mkdtemp()
    for backend in efficiency.BACKENDS:
        exported, parity = efficiency.export_with_parity(encoders["student_fpd_ts"], (patch,), backend=backend,
                                                         workdir=workdir, atol=1e-4, name=f"student_{backend}")
        latency = efficiency.measure_latency(exported, (patch[:1].numpy(),), repeats=cfg.latency_repeats)
        costs[f"student_fpd_ts_{backend}"] = {"ms_patch": np.asarray(latency.times_ms),
                                              "parity_max_abs_diff": parity.max_abs_diff}
    rate = throughput(fast_teacher(teacher, cfg.device, cfg.teacher_compile), size, cfg.teacher_batch, amp=cfg.amp,
                      repeats=cfg.latency_repeats, device=cfg.device)
    costs["teacher"].update(patches_per_s=rate, tflops_achieved=rate * costs["teacher"]["gflops_patch"] / 1e3)
    if cfg.device == "cuda":
        gpu = efficiency.measure_latencies({name: (encoders[name].to("cuda"), (patch[:1],))
                                            for name in ("teacher", "student_fpd_ts")}, repeats=cfg.latency_repeats)
        for name, report in gpu.items():
            costs[name]["ms_patch_gpu"] = np.asarray(report.times_ms)
            costs[name]["s_bag_gpu"] = cfg.cost_bag_size * np.asarray(report.times_ms) / 1e3
    return costs


def record_costs(costs: Costs, cfg: Config, input_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 2's records of :func:`table2_costs` at ``input_size`` (its :func:`cost_input_size`), with their units
    and how each was timed, and their per-sample outputs: a wall-clock metric's record is the median of its
    repeats, which are its lines (``row, seed, unit, metric, value``, unit ``rep00``, ``rep01``, … shared by the
    rows timed in one round; ``record_frame(..., aggregate="median")``); a count has none."""
    notes = {"ms_patch": "CPU, median of single-input calls", "s_bag": "CPU, median over rounds",
             "ms_patch_gpu": "CUDA, one input a call, fp32, eager, synchronised",
             "s_bag_gpu": f"CUDA: ms_patch_gpu x {cfg.cost_bag_size} (one input a call; the teacher batched: "
                          "patches_per_s), the MIL head left out",
             "patches_per_s": f"{cfg.device}, batches of {cfg.teacher_batch}, amp={cfg.amp}"
                              + (", torch.compile" if cfg.teacher_compile and cfg.device == "cuda" else ""),
             "tflops_achieved": f"{cfg.device}: inputs/s x counted FLOPs per input"}
    config = {"input_size": input_size, "patch_size": cfg.patch_size, "bag_size": cfg.cost_bag_size,
              "teacher": cfg.teacher, "threads": torch.get_num_threads(), "device": cfg.device}
    same_size = f"teacher and students alike on {input_size}x{input_size} inputs"
    lines, repeats = [], []
    for row, values in costs.items():
        for metric, value in values.items():
            if isinstance(value, np.ndarray):
                repeats.append(pd.DataFrame({"row": row, "seed": 0, "unit": sample_outputs.repeat_units(len(value)),
                                             "metric": metric, "value": value}))
                value = float(np.median(value))
            lines.append({"row": row, "metric": metric, "value": value, "unit": TABLE2_UNITS[metric],
                          "notes": "; ".join(filter(None, (same_size, notes.get(metric)))), "config": config})
    frame = pd.DataFrame(lines).assign(dataset=f"{input_size}px inputs, bags of {cfg.cost_bag_size}",
                                       dataset_checksum="not applicable")
    return frame, pd.concat(repeats, ignore_index=True)


def throughput(encoder: nn.Module, input_size: int, batch_size: int, *, amp: bool = False, repeats: int = 5,
               device: str = "cpu") -> np.ndarray:
    """Inputs per second of ``encoder`` on batches of ``batch_size`` random (input_size x input_size) images, under
    the same autocast as :func:`teacher_features`, one per timed batch after one warm-up ((repeats,); CUDA
    synchronised)."""
    dev = torch.device(device)
    encoder.to(dev).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, amp):
            return encoder(x)

    batch = torch.rand(batch_size, 3, input_size, input_size, device=dev)
    seconds = np.asarray(efficiency.measure_latency(run, (batch,), warmup=1, repeats=repeats, device=dev).times_ms) / 1e3
    return batch_size / seconds

"""Training-step time of Med-Tuning's rows at a profile's size, eager and with the GPU switches other papers use.

At the gpu profile Med-Tuning's Table 1 and 2 take about 23 minutes of training on an H200 with the GPU busy (87 %)
yet at ~20 TFLOP/s, a few per cent of the chip's bf16 rate: the slices' first stage keeps 64 x 64 tokens of 64
channels, so most time goes to memory-bound convolutions and element-wise kernels. This times one optimizer step
(forward, Dice loss, backward, Adam) on random volumes of the profile's shape, per row and per variant:

- ``eager``: what the notebook runs;
- ``channels_last``: NHWC weights (the slices' convolutions then run NHWC, as EFCM's and RD's models do on CUDA);
- ``compile``: ``torch.compile`` of the whole model (its compile time printed apart), with or without NHWC.

and prints the seconds a step, the peak memory and what the profile's epochs of that row would take. Nothing is
asserted: a benchmark, not a test.

    python benchmarks/med_tuning_step.py --profile gpu --device cuda --out step.json
    python benchmarks/med_tuning_step.py --profile smoke --rows full med_tuning --variants eager channels_last
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from timing import seconds_per_call, sync  # benchmarks/timing.py, beside this script

from mdbench.papers.med_tuning import experiment as mt
from mdbench.runner import profile_config

VARIANTS = ("eager", "channels_last", "compile", "compile_channels_last")


def time_steps(row: str, cfg: mt.Config, variant: str, warmup: int, repeats: int) -> dict:
    """Median seconds of one training step of ``row`` under ``variant``, the first step's seconds (compile time
    where compiled) and the peak memory."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    model = mt.build_row_model(row, cfg).to(device)
    if "channels_last" in variant:  # the 2D convolutions only: the 3D ones have no NHWC layout
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=torch.channels_last)
    run = torch.compile(model) if variant.startswith("compile") else model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, amsgrad=True)
    loss_fn = mt.dice_loss()
    images = torch.rand(cfg.batch_size, 1, cfg.num_slices, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, len(mt.CLASSES), (cfg.batch_size, cfg.num_slices, cfg.image_size, cfg.image_size),
                           device=device)
    dtype = torch.bfloat16 if cfg.amp and device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(run(images), labels.unsqueeze(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    sync(device)
    first_s = time.perf_counter() - start
    s_per_step = seconds_per_call(step, device, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return {"row": row, "variant": variant, "s_per_step": s_per_step, "first_step_s": first_s,
            "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu", help="whose Med-Tuning parameters (sizes, batch, amp) to use")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", nargs="+", default=["full", "med_tuning"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=17, help="130 volumes, 2 folds, batch 4: 17")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    cfg = profile_config("med_tuning", args.profile, mt.Config, device=args.device)
    print(f"Med-Tuning {args.profile}: batch {cfg.batch_size} x {cfg.num_slices} slices of {cfg.image_size} px, "
          f"amp {cfg.amp}, {cfg.epochs} epochs of {args.steps_per_epoch} steps, on {args.device}")
    rows = []
    for row in args.rows:
        for variant in args.variants:
            result = time_steps(row, cfg, variant, args.warmup, args.repeats)
            result["s_per_run"] = result["s_per_step"] * args.steps_per_epoch * cfg.epochs
            rows.append(result)
            print(f"{row:12s} {variant:22s} {result['s_per_step'] * 1e3:8.1f} ms/step  first {result['first_step_s']:6.1f} s"
                  f"  peak {result['peak_mb']:8.0f} MiB  -> {result['s_per_run']:6.1f} s a fold's run", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

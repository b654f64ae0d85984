"""Throughput of the LiteMedSAM image encoder as a patch-feature teacher (EFCM stage 1), against the device's own
dense bf16 matrix-multiply rate.

Prints, per batch size: patches/s, the achieved TFLOP/s (FLOPs counted once by ``mdbench.efficiency.count_flops``)
and that rate as a fraction of a large bf16 GEMM measured on the same device, which stands in for what the chip can
do. Nothing is asserted: this is a benchmark, not a test.

    python benchmarks/teacher_throughput.py                      # CPU, batch 1 and 4
    python benchmarks/teacher_throughput.py --device cuda --batch 1 16 64 256 --compile --out teacher.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timing import seconds_per_call  # benchmarks/timing.py, beside this script

from mdbench.efficiency import count_flops
from mdbench.models import build_model


def gemm_tflops(device: torch.device, n: int, repeats: int) -> float:
    """Dense bf16 (n x n) @ (n x n) rate in TFLOP/s: the yardstick for what this device's matrix units deliver."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = seconds_per_call(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * n**3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd encoder")
    parser.add_argument("--gemm-size", type=int, default=None, help="default 8192 on CUDA, 2048 on CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    encoder = build_model("litemedsam_encoder").eval().to(device)
    size = encoder.input_size
    flops_per_patch = count_flops(encoder.cpu(), torch.rand(1, 3, size, size)).flops
    encoder.to(device).to(memory_format=torch.channels_last)
    gemm = gemm_tflops(device, args.gemm_size or (8192 if device.type == "cuda" else 2048), args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; bf16 GEMM {gemm:.1f} TFLOP/s; "
          f"encoder {flops_per_patch / 1e9:.1f} GFLOPs per {size}x{size} patch")

    variants = {"eager": encoder}
    if args.compile:
        variants["compiled"] = torch.compile(encoder)
    rows = []
    for variant, model in variants.items():
        for batch in args.batch:
            x = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)

            def step(model=model, x=x, variant=variant):  # bind this iteration's values (ruff B023)
                with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    return model.pooled(x) if variant == "eager" else model(x).mean(dim=(2, 3))

            seconds = seconds_per_call(step, device, warmup=3, repeats=args.repeats)
            tflops = batch * flops_per_patch / seconds / 1e12
            row = {"variant": variant, "batch": batch, "amp_bf16": args.amp, "patches_per_s": batch / seconds,
                   "tflops": tflops, "fraction_of_gemm": tflops / gemm, "gemm_tflops": gemm, "device": name}
            rows.append(row)
            print(f"{variant:>8} batch {batch:>4}: {row['patches_per_s']:9.1f} patches/s, {tflops:7.2f} TFLOP/s "
                  f"= {100 * row['fraction_of_gemm']:5.1f} % of the bf16 GEMM rate")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

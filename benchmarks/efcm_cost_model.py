"""What the EFCM notebook costs at a profile, before running it: FLOPs per stage x how often it runs, turned into
seconds with stated (conservative) GPU rates, and the GPU utilisation those seconds imply.

Counts come from the profile's parameters (``paper.yaml``) and the real bags (``--data-dir``: bag sizes, folds);
FLOPs per input from ``mdbench.efficiency.count_flops`` on the teacher, the students and a CLAM-SB head. A stage
takes ``max(FLOPs / rate, steps x step_ms)``: either the GPU computes, or it waits for the host to launch the
next step's kernels (small MIL steps are launch-bound). A compute-bound stage counts as ``busy`` utilisation, a
launch-bound one as ``launch_bound_busy``. Nothing is asserted: the measured minutes and utilisation of a real run
replace these estimates.

    python benchmarks/efcm_cost_model.py --data-dir ../shared/data            # the gpu profile
"""
from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch

from mdbench import runner
from mdbench.efficiency import count_flops
from mdbench.models import build_model
from mdbench.notebook import SESSION_PARAMS
from mdbench.papers.efcm import experiment as efcm


def _gflops(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    return count_flops(model.eval(), inputs).flops / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--teacher-per-s", type=float, default=690.0,
                        help="teacher inputs/s: 0.8 x the best H100 row of results/efcm/benchmarks")
    parser.add_argument("--compile-s", type=float, default=60.0, help="one torch.compile of the teacher")
    parser.add_argument("--train-tflops", type=float, default=20.0,
                        help="bf16 training rate of the small students (2 %% of an H200's dense peak)")
    parser.add_argument("--head-step-ms", type=float, default=3.0, help="one MIL-head step (launch-bound)")
    parser.add_argument("--etc-step-ms", type=float, default=10.0, help="one ETC step's launches")
    parser.add_argument("--distill-step-ms", type=float, default=4.0, help="one stage-1 step's launches")
    parser.add_argument("--launch-bound-busy", type=float, default=0.3,
                        help="GPU utilisation while launch-bound")
    parser.add_argument("--busy", type=float, default=0.95, help="GPU utilisation while compute-bound")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="no local pretrained weights")

    entry = {p.paper: p for p in runner.load_papers()}["efcm"]
    params = {**entry.parameters_for(runner.load_profile(args.profile)), "data_dir": args.data_dir}
    cfg = efcm.Config.from_params({k: v for k, v in params.items() if k not in SESSION_PARAMS})
    data = efcm.load_data(cfg)
    side = cfg.patch_size
    teacher = _gflops(build_model("litemedsam_encoder"), torch.rand(1, 3, 256, 256))
    students = {v: _gflops(s, torch.rand(1, 3, side, side)) for v, s in efcm.students(cfg, 256).items()}
    head = _gflops(build_model("clam_sb", in_dim=256, hidden=cfg.head_hidden), torch.randn(16, 256))  # 16 instances
    rate = args.train_tflops * 1e3  # GFLOP/s
    rows = []  # (stage, runs, GFLOPs, seconds, compute-bound)

    def stage(name: str, runs: int, gflops: float, steps: int, step_ms: float) -> None:
        compute, launches = gflops / rate, steps * step_ms / 1e3
        rows.append((name, runs, gflops, max(compute, launches), compute >= launches))

    patches = sum(sum(len(b[0]) for b in d.bags) for d in data.values() if d.kind == "patches")
    seconds = patches / args.teacher_per_s + (args.compile_s if cfg.teacher_compile else 0)
    rows.append(("teacher features (once, cached)", patches, patches * teacher, seconds, True))
    runs = len(cfg.seeds) * cfg.folds
    for name, d in data.items():
        sizes = np.array([len(b[0]) for b in d.bags])
        n_train = round(len(sizes) * (cfg.folds - 1) / cfg.folds * (1 - 1 / max(2, cfg.folds - 1)))
        n_val = round(len(sizes) * (cfg.folds - 1) / cfg.folds) - n_train
        mean = sizes.mean()
        per_epoch = math.ceil(n_train / cfg.bag_batch) + math.ceil(n_val / cfg.bag_batch)
        heads = len(cfg.heads) + (3 if d.kind == "patches" else 0)  # the MIL-head table, the 3 Retrain heads
        stage(f"{name}: {heads} CLAM heads x {cfg.head_epochs} epochs", runs,
              runs * heads * cfg.head_epochs * (n_train * 3 + n_val) * mean * head / 16,
              runs * heads * cfg.head_epochs * per_epoch, args.head_step_ms)
        if d.kind != "patches":
            continue
        p_train = n_train * mean
        steps = cfg.distill_epochs * max(1, int(p_train // cfg.distill_batch))
        stage(f"{name}: stage 1, 3 students x {cfg.distill_epochs} epochs", runs,
              runs * steps * cfg.distill_batch * 3 * sum(students.values()), runs * 3 * steps, args.distill_step_ms)
        stage(f"{name}: students' features for Retrain", runs, runs * sizes.sum() * sum(students.values()),
              runs * 3 * math.ceil(len(sizes) / cfg.bag_batch), args.head_step_ms)
        with_grad = np.minimum(sizes, cfg.etc_max_patches).mean()
        per_bag = 3 * with_grad + (mean - with_grad)  # forward + backward where gradients flow, forward elsewhere
        stage(f"{name}: ETC, 3 runs x {cfg.etc_epochs} epochs", runs,
              runs * 3 * cfg.etc_epochs * (n_train * per_bag + n_val * mean) * students["fpd_ts"],
              runs * 3 * cfg.etc_epochs * per_epoch, args.etc_step_ms)

    print(f"profile {args.profile}: {len(cfg.seeds)} seed(s) x {cfg.folds} folds; teacher {teacher:.1f} GFLOPs per "
          f"256 px input, students {', '.join(f'{v} {f:.2f}' for v, f in students.items())} GFLOPs per {side} px "
          f"patch; rates: teacher {args.teacher_per_s:g}/s, training {args.train_tflops:g} TFLOP/s")
    total = busy = 0.0
    for name, count, gflops, secs, bound in rows:
        total += secs
        busy += secs * (args.busy if bound else args.launch_bound_busy)
        print(f"{name:55s} {count:>7d} {gflops / 1e3:10.1f} TFLOP {secs:8.1f} s  "
              f"{'compute' if bound else 'launch'}-bound")
    print(f"total {total / 60:.1f} min of GPU work (plus data loading and Table 2 on the CPU); estimated mean GPU "
          f"utilisation {100 * busy / total:.0f} %")


if __name__ == "__main__":
    main()

"""Scale-out of `mdbench reproduce --executor dask` on one machine's GPUs: wall time of one GPU against all of them.

Three runs, each through the Dask executor on a local cluster (one worker per GPU, CUDA_VISIBLE_DEVICES pinning each),
each into a results folder of its own under --work:

  one-gpu     the notebooks of --papers one after another on one GPU (a cluster of one worker)
  two-at-once the same notebooks on every GPU at once (one task per GPU)
  sharded     the first paper's seeds split over every GPU (--shards = the GPU count), then merged

Prints each run's wall time, its speed-up over one GPU, and for the sharded notebook the ratio of its time to half
its one-GPU time (the aim: within 1.2); --json writes the same numbers. Nothing is asserted: a benchmark, not a test.

    python benchmarks/scaleout.py --papers quickstart efcm --profile gpu --data-dir /data --json scaleout.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mdbench import dask_executor, runner


def timed(label: str, **kwargs) -> dict:
    """Wall seconds and per-notebook results of one executor run."""
    start = time.perf_counter()
    results = dask_executor.reproduce(progress=False, log=lambda line: None, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label:<12} {seconds:8.1f} s   " + ", ".join(f"{r.notebook}: {r.status}" for r in results), flush=True)
    return {"run": label, "seconds": seconds, "results": [{"paper": r.paper, "notebook": r.notebook,
                                                           "status": r.status, "minutes": r.minutes}
                                                          for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--papers", nargs="+", default=["quickstart", "efcm"])
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--gpus", type=int, default=None, help="default: every GPU torch sees")
    parser.add_argument("--work", type=Path, default=Path("build/scaleout"), help="the runs' results folders")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    profile = runner.load_profile(args.profile)
    if profile.requires_gpu:
        import torch

        gpus = args.gpus or torch.cuda.device_count()
    else:  # a dry run of the benchmark on CPU workers
        gpus = args.gpus or 2
    common = {"profile_name": args.profile, "data_dir": args.data_dir}
    rows = [timed("one-gpu", papers=args.papers, n_workers=1, results_dir=args.work / "one-gpu", **common),
            timed("two-at-once", papers=args.papers, n_workers=gpus, results_dir=args.work / "at-once", **common),
            timed("sharded", papers=args.papers[:1], n_workers=gpus, shards=gpus,
                  results_dir=args.work / "sharded", **common)]
    one = rows[0]["seconds"]
    rows[1]["speedup"] = one / rows[1]["seconds"]
    first = next(r for r in rows[0]["results"] if r["paper"] == args.papers[0])
    half = 60 * first["minutes"] / gpus  # its notebook's own minutes in the one-GPU run
    rows[2]["ratio_to_ideal"] = rows[2]["seconds"] / half if half else None
    print(f"\n{len(args.papers)} notebooks on {gpus} GPUs at once: {rows[1]['speedup']:.2f}x one GPU")
    print(f"{args.papers[0]} sharded over {gpus} GPUs: {rows[2]['seconds']:.0f} s, "
          f"{rows[2]['ratio_to_ideal']:.2f}x its one-GPU time / {gpus} (aim: <= 1.2)")
    if args.json:
        args.json.write_text(json.dumps({"gpus": gpus, "profile": args.profile, "papers": args.papers,
                                         "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where the time of one EFCM fold goes: cProfile over :func:`mdbench.papers.efcm.experiment.run_split` on one
fold of one dataset at a profile's parameters (paper.yaml), after the teacher's features.

On CUDA, time spent waiting for the GPU shows up in the calls that synchronise (``.item()``, ``.cpu()``,
``.tolist()``, ``torch.cuda.synchronize``); everything else is host time. Prints the top functions by own time
and by cumulative time, and the fold's wall time.

    python benchmarks/efcm_fold_profile.py --profile gpu --dataset isic2017 [--data-dir D] [--n-bags N] [--folds K]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import yaml

from mdbench import runner
from mdbench.papers.efcm import experiment as efcm


def config(profile: str, overrides: dict) -> efcm.Config:
    """The Config ``mdbench reproduce --paper efcm --profile <profile>`` runs (:func:`mdbench.runner.profile_config`),
    on CUDA where there is one, with ``overrides``."""
    return runner.profile_config("efcm", profile, efcm.Config,
                                 **{"device": "cuda" if torch.cuda.is_available() else "cpu", **overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--dataset", default="isic2017")
    parser.add_argument("--data-dir")
    parser.add_argument("--n-bags", type=int)
    parser.add_argument("--folds", type=int, help="k of the k-fold (default: the profile's)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--top", type=int, default=35, help="functions listed; 0: time the fold without cProfile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter (YAML value), e.g. --set bag_batch=128")
    args = parser.parse_args()
    given = {"datasets": [args.dataset], "data_dir": args.data_dir, "n_bags": args.n_bags, "folds": args.folds}
    overrides = {k: v for k, v in given.items() if v is not None}
    cfg = config(args.profile, {**overrides, **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.set)}})
    data = efcm.load_data(cfg)[args.dataset]
    start = time.perf_counter()
    features, _ = efcm.encode(efcm.teacher_model(cfg), {args.dataset: data}, cfg)
    print(f"{args.dataset}: {len(data.bags)} bags; teacher features in {time.perf_counter() - start:.1f} s")
    bags = efcm.BagSet.of(data.bags, cfg.device)
    feats = efcm.BagSet.of(features[args.dataset], cfg.device)
    index = efcm.fold_index(data.labels, cfg.folds, cfg.seeds[0])[args.fold]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    if args.top:
        profiler.enable()
    efcm.run_split(bags, feats, index, cfg, cfg.seeds[0])
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    print(f"fold {args.fold} of {cfg.folds}: {time.perf_counter() - start:.1f} s wall on {cfg.device}; set: {args.set}")
    for key in ("tottime", "cumulative") if args.top else ():
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(args.top)
        print(f"--- by {key} ---\n" + "\n".join(out.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main()

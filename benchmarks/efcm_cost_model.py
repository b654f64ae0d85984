"""What the EFCM notebook costs at a profile, before running it (``mdbench.papers.efcm.budget``): FLOPs per stage x
how often it runs, in seconds at stated GPU rates, and the GPU utilisation they imply. The notebook prints the same
estimate before its experiments; this runs it without a GPU or a notebook. Nothing is asserted.

    python benchmarks/efcm_cost_model.py --data-dir ../shared/data                 # the gpu profile
    python benchmarks/efcm_cost_model.py --data-dir ../shared/data --head-step-ms 5
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings

from mdbench import runner
from mdbench.notebook import SESSION_PARAMS
from mdbench.papers.efcm import budget
from mdbench.papers.efcm import experiment as efcm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--profile", default="gpu")
    for field in dataclasses.fields(budget.Rates):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=float, default=field.default)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="no local pretrained weights")
    rates = budget.Rates(**{f.name: getattr(args, f.name) for f in dataclasses.fields(budget.Rates)})
    entry = {p.paper: p for p in runner.load_papers()}["efcm"]
    params = {**entry.parameters_for(runner.load_profile(args.profile)), "data_dir": args.data_dir}
    cfg = efcm.Config.from_params({k: v for k, v in params.items() if k not in SESSION_PARAMS})
    frame = budget.estimate(cfg, efcm.load_data(cfg), rates=rates)
    print(f"profile {args.profile}: {len(cfg.seeds)} seed(s) x {cfg.folds} folds; {rates}")
    print(frame.round(1).to_string(index=False))
    print(f"total {frame['seconds'].sum() / 60:.1f} min of GPU work (plus loading the data and Table 2 on the CPU); "
          f"estimated mean GPU utilisation {budget.utilisation(frame, rates):.0f} %")


if __name__ == "__main__":
    main()

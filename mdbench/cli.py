"""The ``mdbench`` command: ``reproduce``, ``doctor`` and ``data list|check``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _reproduce(args: argparse.Namespace) -> int:
    from mdbench.runner import reproduce, summary_table

    results = reproduce(papers=args.paper, profile_name=args.profile, jobs=args.jobs,
                        results_dir=args.results_dir, data_dir=args.data_dir, progress=not args.quiet)
    print()
    print(summary_table(results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"\n{len(failed)} notebook(s) failed; executed notebooks and stderr are in the results folder.")
    return 1 if failed else 0


def _doctor(args: argparse.Namespace) -> int:
    from mdbench.doctor import diagnose

    lines, problems = diagnose()
    print("\n".join(lines))
    if problems:
        print("\nproblems:")
        print("\n".join(f"  - {p}" for p in problems))
        return 1
    print("\nno problems found")
    return 0


def _data_list(args: argparse.Namespace) -> int:
    from mdbench.data.registry import dataset_table

    rows = dataset_table(args.data_dir)
    print(f"{'dataset':<16} {'present':<8} {'task':<34} {'licence'}")
    for r in rows:
        print(f"{r['name']:<16} {'yes' if r['present'] else 'no':<8} {r['task']:<34} {r['licence']}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from mdbench.data.checksums import verify_sha256sums
    from mdbench.data.registry import DATASETS, data_root, get_spec

    root = data_root(args.data_dir)
    names = args.names or list(DATASETS)
    bad = 0
    for name in names:
        folder = root / get_spec(name).folder
        if not folder.is_dir():
            print(f"{name:<16} absent ({folder})")
            continue
        report = verify_sha256sums(folder)
        print(f"{name:<16} {report.summary()}")
        bad += not report.ok
    return 1 if bad else 0


def _execute_notebooks(args: argparse.Namespace) -> int:
    from mdbench.runner import NOTEBOOKS_DIR, execute_in_place

    paths = args.notebooks or sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    for path in paths:
        print(f"executing {path} ...", flush=True)
        execute_in_place(Path(path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mdbench.runner import available_profiles

    parser = argparse.ArgumentParser(prog="mdbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="execute the paper notebooks with papermill at a profile")
    rep.add_argument("--paper", action="append", help="paper to run (repeatable; default: all in the manifest)")
    rep.add_argument("--profile", default="cpu", choices=available_profiles(), help="default: cpu")
    rep.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1)")
    rep.add_argument("--results-dir", type=Path, default=None, help="default: results/ or MDBENCH_RESULTS_DIR")
    rep.add_argument("--data-dir", type=Path, default=None, help="default: MDBENCH_DATA_DIR")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=_reproduce)

    doc = sub.add_parser("doctor", help="check this machine: Python, packages, CUDA, kernel, data")
    doc.set_defaults(func=_doctor)

    exe = sub.add_parser("execute-notebooks", help="re-run notebooks in place at their smoke defaults (for nbval)")
    exe.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    exe.set_defaults(func=_execute_notebooks)

    data = sub.add_parser("data", help="the dataset registry")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    lst = data_sub.add_parser("list", help="each dataset, its task and licence, and whether it is present")
    lst.add_argument("--data-dir", type=Path, default=None)
    lst.set_defaults(func=_data_list)
    chk = data_sub.add_parser("check", help="verify each present dataset against its SHA256SUMS")
    chk.add_argument("names", nargs="*", help="datasets to check (default: all)")
    chk.add_argument("--data-dir", type=Path, default=None)
    chk.set_defaults(func=_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mdbench.data.errors import DataError
    from mdbench.results import PaperReferenceError, RecordError
    from mdbench.runner import RunnerError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RunnerError, DataError, RecordError, PaperReferenceError, OSError) as err:
        print(f"mdbench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

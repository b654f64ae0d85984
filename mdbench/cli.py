"""The ``mdbench`` command line.

Building the parser and answering ``--help``, ``doctor`` and ``data list`` import nothing heavy (no torch, pandas,
papermill or nbformat): each command imports what it needs when it runs, so that they answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdbench.results import ResultStore

DESCRIPTION = """\
Reproduce four papers on efficient adaptation and compression of medical foundation models, as notebooks.

  mdbench doctor                          what this machine has and lacks
  mdbench reproduce --profile smoke       every notebook on synthetic data (a few minutes, no data needed)
  mdbench reproduce --data-dir DIR        every notebook on the real datasets under DIR (profile cpu)
  mdbench data list --data-dir DIR        which datasets DIR holds
  mdbench report                          a static HTML site of the results (offline)
  mdbench compare results runs/RUN        does a rerun (written to runs/<stamp>-<profile>/) agree with results/?

`mdbench COMMAND --help` says more; `mdbench reproduce --help` lists the papers and profiles."""


def _reproduce(args: argparse.Namespace) -> int:
    """Exit status: 0 every notebook that ran is ok; 1 one failed or timed out; 2 (from ``main``) bad input, a results
    folder in use by another run, or nothing to run; 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM."""
    from mdbench.runner import Interrupted, outputs_text, resolve_results_dir, summary_table, tally_text

    if args.no_verify_data:  # the notebooks' processes inherit it; their records' fingerprints say so
        os.environ["MDBENCH_VERIFY_DATA"] = "0"
    results_dir = resolve_results_dir(_run_folder(args))
    try:
        results = _executor(args)(papers=args.paper, profile_name=args.profile, jobs=args.jobs,
                            results_dir=results_dir, data_dir=args.data_dir, progress=not args.quiet,
                            papers_dir=args.papers_dir, resume=args.resume)
    except Interrupted as stopped:
        print(f"\n{summary_table(stopped.results)}\n\n{outputs_text(stopped.results, results_dir)}")
        print(f"\nmdbench: {stopped}: the running notebooks were stopped; the last good outputs are kept.",
              file=sys.stderr)
        return 128 + stopped.signum
    ran = [r.paper for r in results if r.status in ("ok", "failed")]
    print(f"\n{summary_table(results)}\n\n{outputs_text(results, results_dir)}\n\n"
          f"{tally_text(results_dir, args.profile, ran)}\n\n{_where_text(args, results_dir)}")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"\n{len(failed)} notebook(s) failed: their failed notebooks and logs are listed above.")
    return 1 if failed else 0


def _run_folder(args: argparse.Namespace) -> Path:
    """Where ``reproduce`` writes: ``--results-dir`` if given; the reference (results/ or MDBENCH_RESULTS_DIR) with
    ``--update-reference``; with ``--resume``, the newest run folder of the profile; else a new run-stamped folder
    ``<runs>/<UTC stamp>-<profile>/`` (:mod:`mdbench.runs`), so that a rerun never overwrites the reference."""
    from mdbench import runs

    if args.results_dir is not None:
        return args.results_dir
    if args.update_reference:
        from mdbench.results import results_root

        return results_root()
    return runs.latest_run_folder(args.profile) if args.resume else runs.new_run_folder(args.profile)


def _where_text(args: argparse.Namespace, results_dir: Path) -> str:
    """The folder the run wrote to, and for a run beside the reference, how to compare the two."""
    from mdbench.results import results_root

    if results_dir == results_root().absolute():
        return f"outputs of this run: {results_dir} (the reference results)"
    return (f"outputs of this run: {results_dir}\ncompare with the reference: mdbench compare {results_root()} "
            f"{results_dir} --profile {args.profile}")


def _executor(args: argparse.Namespace):
    """The ``reproduce`` of ``--executor``: :func:`mdbench.runner.reproduce` (local, the default), or
    :func:`mdbench.dask_executor.reproduce` with ``--address`` and ``--shards``, which only it takes."""
    from mdbench.runner import RunnerError, reproduce

    if args.executor == "local":
        if args.address is not None or args.shards != 1:
            raise RunnerError("--address and --shards need --executor dask")
        return reproduce
    from functools import partial

    from mdbench.dask_executor import reproduce as on_dask

    return partial(on_dask, address=args.address, shards=args.shards)


def _doctor(args: argparse.Namespace) -> int:
    """Exit status 1 only for a problem that stops even the smoke profile; missing data or GPU are notes."""
    from mdbench.doctor import diagnose

    found = diagnose()
    print("\n".join(found.lines))
    if found.notes:
        print("\nnotes:")
        print("\n".join(f"  - {note}" for note in found.notes))
    if found.problems:
        print("\nproblems:")
        print("\n".join(f"  - {p}" for p in found.problems))
        return 1
    print("\nno problems: `mdbench reproduce --profile smoke` can run here")
    return 0


def _data_list(args: argparse.Namespace) -> int:
    from mdbench.data.registry import data_root, dataset_table

    if args.data_dir is not None:
        data_root(args.data_dir)  # a wrong --data-dir is an error, not a table of absent datasets
    rows = dataset_table(args.data_dir)
    print(f"{'dataset':<16} {'present':<8} {'task':<34} {'licence'}")
    for r in rows:
        print(f"{r['name']:<16} {'yes' if r['present'] else 'no':<8} {r['task']:<34} {r['licence']}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    """Verify datasets with the loaders' own check; 1 if any listed file is missing or differs, any file is
    unlisted, a folder has no valid SHA256SUMS, a dataset named on the command line is absent, or none is present."""

    from mdbench.data.checksums import verify_sha256sums
    from mdbench.data.errors import DataError
    from mdbench.data.registry import DATASETS, data_root, get_spec

    root = data_root(args.data_dir)
    specs = [get_spec(name) for name in args.names or DATASETS]  # refuse an unknown name before hashing
    failed, checked = [], 0
    for spec in specs:
        folder = root / spec.folder
        if not folder.is_dir():
            print(f"{spec.name:<16} absent  {folder}")
            if args.names:  # asked for by name, so its absence is a failure
                failed.append(spec.name)
            continue
        checked += 1
        try:
            report = verify_sha256sums(folder, use_cache=args.fast)
        except DataError as err:  # no or malformed SHA256SUMS: this dataset fails, the others are still checked
            print(f"{spec.name:<16} FAILED  {err}")
            failed.append(spec.name)
            continue
        print(f"{spec.name:<16} {'ok' if report.passed else 'FAILED':<7} {report.summary()}")
        for kind, path in report.problems():
            print(f"  {kind:<11} {os.path.join(folder, path)}")  # keeps an unlisted folder's trailing /
        if not report.passed:
            failed.append(spec.name)
    if failed:
        print(f"\n{len(failed)} dataset(s) failed: {', '.join(failed)}. Restore them from their sources "
              "(data_cards/<name>.md) and move unlisted files out of their folders.")
        return 1
    if not checked:
        print(f"\nno dataset found under {root}: point --data-dir or MDBENCH_DATA_DIR at the folder that holds "
              "the datasets (pbc/, isic2017/, ...)")
        return 1
    return 0


def _data_register(args: argparse.Namespace) -> int:
    """Check a folder in a standard layout and register it under a name that notebooks take as ``dataset``."""
    from mdbench.data import own

    entry = own.register(args.name, args.path, args.layout)
    print(f"registered {entry.name!r}: {entry.layout} at {entry.path}, classes {', '.join(entry.classes)} (in "
          f"{own.datasets_file()})\nrun a notebook on it with `papermill notebooks/<notebook>.ipynb out.ipynb -p "
          f"dataset {entry.name} -p profile cpu` (README, \"Use your own dataset\", says which notebooks take it)")
    return 0


def _stores(args: argparse.Namespace) -> list[ResultStore] | None:
    """The result stores of ``--paper`` (default: every paper with records) at ``--profile`` under
    ``--results-dir``; None, with the reason on stderr, where one of them holds no records. An unknown paper is a
    :class:`~mdbench.paper_yaml.PaperFileError` that lists the known ones."""
    from mdbench.paper_yaml import known_papers, paper_file
    from mdbench.results import ResultStore, results_root

    root = args.results_dir or results_root()
    for paper in args.paper or ():
        paper_file(paper)
    papers = args.paper or [p for p in known_papers() if (root / p / args.profile / "records").is_dir()]
    if not papers:
        print(f"mdbench: no records at profile {args.profile!r} under {root}", file=sys.stderr)
        return None
    stores = [ResultStore(paper, args.profile, root=root) for paper in papers]
    for store in stores:
        if not store.records():
            print(f"mdbench: no records of {store.paper} at profile {args.profile!r} under {store.records_dir}",
                  file=sys.stderr)
            return None
    return stores


def _judge(args: argparse.Namespace) -> int:
    """Re-judge the claims of each paper's records at a profile (no retraining) and rewrite the summary."""
    from mdbench import verdicts
    from mdbench.results import results_root

    stores = _stores(args)
    if stores is None:
        return 2
    for store in stores:
        _, lines = verdicts.judge_store(store)
        print(f"== {store.paper} ({args.profile})\n" + "\n".join(lines) + "\n")
    root = args.results_dir or results_root()
    verdicts.write_summary(root)
    print(f"claims saved beside each paper's records; every claim check in {root / 'summary.csv'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """Build the static HTML site of the results (every claim tally, table, figure and executed notebook)."""
    from mdbench.report.site import REPORT_DIR, ReportError, build_site
    from mdbench.results import results_root

    root, out = args.results_dir or results_root(), args.out or REPORT_DIR
    try:
        runs = build_site(root, out)
    except ReportError as err:
        print(f"mdbench: {err}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs of {len({r.paper for r in runs})} papers from {root}; open {out.resolve() / 'index.html'}")
    return 0


def _tables(args: argparse.Namespace) -> int:
    """Rebuild every table of each paper at a profile from its records and per-sample outputs (no retraining)."""
    from mdbench.results import save_tables

    stores = _stores(args)
    if stores is None:
        return 2
    for store in stores:
        built = save_tables(store)
        print(f"{store.paper} ({args.profile}): " + ", ".join(f"{name} ({len(t)} lines)" for name, t in built.items())
              + f"; saved as CSV and Markdown in {store.dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Compare a rerun's records and claims with the reference's: 0 all agree, 1 some differ, 2 bad input."""
    from mdbench.compare import CompareError, compare

    try:
        found = compare(args.reference, args.run, papers=args.paper, profiles=args.profile, relative=args.relative)
    except CompareError as err:
        print(f"mdbench: {err}", file=sys.stderr)
        return 2
    print(found.text())
    return 0 if found.all_agree else 1


def _figures(args: argparse.Namespace) -> int:
    """Redraw, from the stored records (no retraining), the Pareto figures of each paper at a profile and the
    cross-paper one, and each paper's figures that its records alone make."""
    from mdbench import figures, pareto

    try:
        paths = pareto.regenerate(args.paper, args.profile, args.results_dir, args.papers_dir)
    except pareto.ParetoError as err:  # e.g. a run made before its paper recorded deployed costs: the rest still draws
        print(f"mdbench figures: no Pareto figures at {args.profile}: {err}", file=sys.stderr)
        paths = []
    paths += figures.regenerate(args.paper, args.profile, args.results_dir, args.papers_dir)
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


def _execute_notebooks(args: argparse.Namespace) -> int:
    from mdbench.runner import NOTEBOOKS_DIR, execute_in_place

    execute_in_place([Path(p) for p in args.notebooks] or sorted(NOTEBOOKS_DIR.glob("*.ipynb")), progress=True)
    return 0


def _add_stored_results_arguments(parser: argparse.ArgumentParser, profiles: list[str]) -> None:
    """--paper, --profile and --results-dir of the commands that rework stored records (judge, tables)."""
    parser.add_argument("--paper", action="append", help="paper (repeatable; default: every paper with records)")
    parser.add_argument("--profile", default="cpu", choices=profiles, help="default: cpu")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/ or MDBENCH_RESULTS_DIR")


def build_parser() -> argparse.ArgumentParser:
    """The ``mdbench`` command line: one sub-command per job."""
    from mdbench.paper_yaml import PAPERS_DIR
    from mdbench.runner import available_profiles

    parser = argparse.ArgumentParser(prog="mdbench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = sub.add_parser("reproduce", help="run the paper notebooks with papermill at a profile",
                         description="Run each paper's notebook with papermill at a profile; its tables, figures and "
                                     "claim checks go to the results folder.",
                         epilog=_reproduce_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("--paper", action="append", metavar="NAME",
                     help="paper to run (repeatable; default: every paper below, in that order)")
    rep.add_argument("--profile", default="cpu", choices=available_profiles(),
                     help="see below (default: cpu, which needs --data-dir)")
    rep.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1)")
    rep.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                     help="write here (default: a new run folder runs/<UTC stamp>-<profile>/, under MDBENCH_RUNS_DIR "
                          "if set, so that the committed reference results/ is left as it is)")
    rep.add_argument("--update-reference", action="store_true",
                     help="write to the reference results/ (or MDBENCH_RESULTS_DIR) instead of a new run folder")
    rep.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                     help="the folder that holds the real datasets (pbc/, isic2017/, ...); wins over "
                          "MDBENCH_DATA_DIR (the default)")
    rep.add_argument("--no-verify-data", action="store_true",
                     help="read the datasets without checking their SHA256SUMS (for your own modified data); "
                          "recorded in every result's fingerprint")
    rep.add_argument("--resume", action="store_true",
                     help="load the units of work (seeds, folds, rows) that an earlier run of the same config and "
                          "code stored under <results>/<paper>/<profile>/work/ instead of computing them again, and "
                          "continue its interrupted trainings from their checkpoints; without --results-dir or "
                          "--update-reference, in the newest run folder of the profile")
    rep.add_argument("--executor", choices=("local", "dask"), default="local",
                     help="local: papermill processes on this machine (default); dask: tasks on a Dask cluster "
                          "(--address, else a local one of one worker per GPU, or per core on CPU profiles)")
    rep.add_argument("--address", default=None, metavar="tcp://HOST:PORT", help="the Dask scheduler (--executor dask)")
    rep.add_argument("--shards", type=int, default=1, metavar="N",
                     help="split each notebook's seeds into N tasks whose units of work a last task merges "
                          "(--executor dask; default 1)")
    rep.add_argument("--quiet", action="store_true",
                     help="one line per notebook as it ends, no live progress (for CI logs)")
    rep.add_argument("--papers-dir", type=Path, default=PAPERS_DIR, help=argparse.SUPPRESS)  # tests run toy papers
    rep.set_defaults(func=_reproduce)

    doc = sub.add_parser("doctor", help="what this machine has for each profile (Python, packages, GPU, Jupyter "
                         "kernel, data) and how to fix what it lacks")
    doc.set_defaults(func=_doctor)

    exe = sub.add_parser("execute-notebooks", help="re-run notebooks in place at their smoke defaults (for nbval)")
    exe.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    exe.set_defaults(func=_execute_notebooks)

    jud = sub.add_parser("judge", help="re-judge the claims on the stored records and per-sample outputs (no "
                         "retraining) and rewrite results/summary.csv")
    _add_stored_results_arguments(jud, available_profiles())
    jud.set_defaults(func=_judge)

    rpt = sub.add_parser("report", help="build a static HTML site of the results for reviewers: claim tallies, tables, "
                         "figures and the executed notebooks; it works offline")
    rpt.add_argument("--results-dir", type=Path, default=None, help="default: results/ or MDBENCH_RESULTS_DIR")
    rpt.add_argument("--out", type=Path, default=None,
                     help="folder of the site (default: build/report/ in the repository); a previous site there is "
                          "replaced")
    rpt.set_defaults(func=_report)

    tab = sub.add_parser("tables", help="rebuild every table of each paper (those its paper.yaml reports) from the "
                         "stored records and per-sample outputs (no retraining)")
    _add_stored_results_arguments(tab, available_profiles())
    tab.set_defaults(func=_tables)

    cmp = sub.add_parser("compare", help="does a rerun agree with the reference? every table cell and claim of two "
                         "results folders side by side",
                         description="Compare the records (table cells) and claim verdicts of the results folder RUN "
                                     "with those of REF. A cell agrees when RUN's mean is within a relative tolerance "
                                     "of REF's (a paper's paper.yaml can set rerun_tolerance: {TABLE: {relative: R}}); "
                                     "wall-clock times (ms, s, min), speed-ups (x) and rates (.../s) are listed but not judged; a claim agrees when "
                                     "both give it the same verdict.",
                         epilog="exit status: 0 all agree; 1 some differ; 2 bad input (a missing folder, no records)")
    cmp.add_argument("reference", type=Path, metavar="REF", help="the reference results folder, e.g. results")
    cmp.add_argument("run", type=Path, metavar="RUN", help="the rerun's folder, e.g. runs/20260102T030405Z-cpu")
    cmp.add_argument("--paper", action="append", help="paper (repeatable; default: every paper RUN has records of)")
    cmp.add_argument("--profile", action="append", choices=available_profiles(),
                     help="profile (repeatable; default: every profile RUN has records of)")
    cmp.add_argument("--relative", type=float, default=0.05,
                     help="relative tolerance of tables their paper.yaml does not set (default 0.05, i.e. 5 %%)")
    cmp.set_defaults(func=_compare)

    fig = sub.add_parser("figures", help="redraw from the stored records (no retraining) each paper's figures that its "
                         "records make and its Pareto, and without --paper the cross-paper Pareto in results/pareto/")
    _add_stored_results_arguments(fig, available_profiles())
    fig.add_argument("--papers-dir", type=Path, default=PAPERS_DIR, help=argparse.SUPPRESS)  # tests run toy papers
    fig.set_defaults(func=_figures)

    data = sub.add_parser("data", help="the dataset registry")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    lst = data_sub.add_parser("list", help="each dataset, its task and licence, and whether it is present")
    lst.add_argument("--data-dir", type=Path, default=None, help="default: MDBENCH_DATA_DIR")
    lst.set_defaults(func=_data_list)
    chk = data_sub.add_parser("check", help="verify each present dataset against its SHA256SUMS: every listed "
                              "file present and unchanged, no file unlisted (exit status 1 otherwise)")
    chk.add_argument("names", nargs="*", help="datasets to check (default: all present)")
    chk.add_argument("--data-dir", type=Path, default=None, help="default: MDBENCH_DATA_DIR")
    chk.add_argument("--fast", action="store_true",
                     help="trust cached digests of files whose size and mtime are unchanged, as loading does "
                          "(default: re-read every byte)")
    chk.set_defaults(func=_data_check)
    reg = data_sub.add_parser("register", help="register your own dataset in a standard layout so that a notebook "
                              "runs on it with -p dataset NAME",
                              description="Check PATH with the layout's loader and store it as NAME in "
                                          "~/.config/mdbench/datasets.yaml (MDBENCH_CONFIG_DIR overrides the folder). "
                                          "classfolders: PATH/<class>/<image>.png, one sub-folder per class; "
                                          "decathlon: PATH/dataset.json with imagesTr/ and labelsTr/ NIfTI volumes.")
    reg.add_argument("name", help="lower-case letters, digits and _, not a built-in dataset's name")
    reg.add_argument("path", type=Path, help="the dataset's folder")
    reg.add_argument("--layout", required=True, choices=["classfolders", "decathlon"])
    reg.set_defaults(func=_data_register)
    return parser


def _reproduce_epilog() -> str:
    """The papers (from their paper.yaml) and profiles (from mdbench/profiles/) for ``reproduce --help``."""
    from mdbench.paper_yaml import PaperFileError
    from mdbench.runner import RunnerError, available_profiles, load_papers, load_profile

    profiles = sorted((load_profile(name) for name in available_profiles()),  # smallest first
                      key=lambda p: (not p.notebook_defaults, p.requires_gpu))
    lines = ["profiles (--profile NAME):"]
    for profile in profiles:
        needs = [*(["--data-dir DIR (or MDBENCH_DATA_DIR)"] if profile.real_data else []),
                 *(["a CUDA GPU"] if profile.requires_gpu else [])]
        lines.append(f"  {profile.name:<7}{profile.description}")
        lines.append(f"  {'':<7}needs {' and '.join(needs) if needs else 'no data and no GPU'}")
    try:
        papers = load_papers()
    except (PaperFileError, RunnerError) as err:  # --help still answers, and says what is wrong
        return "\n".join([*lines, "", f"papers: cannot be listed: {err}"])
    minutes = "/".join(profile.name for profile in profiles)
    lines += ["", f"papers (--paper NAME; run in this order; minutes expected at {minutes}):"]
    for paper in papers:
        expected = "/".join(f"{paper.minutes[profile.name]:g}" for profile in profiles)
        lines.append(f"  {paper.paper:<12}{expected:<10}{paper.title}")
    lines += ["", "While it runs, the terminal shows each notebook's section and cell, the time spent and the time "
              "expected;", "each notebook's full live log is <results>/<paper>/<profile>/<notebook>.log.",
              "", "exit status: 0 every notebook that ran is ok; 1 a notebook failed or timed out; 2 bad input, a "
              "results folder", "in use by another run, or nothing to run; 130/143 stopped by SIGINT/SIGTERM"]
    return "\n".join(lines)


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input or a bad file, reported in one line with exit status 2 (anything else is a bug
    and keeps its traceback). mdbench.results imports torch, so its RecordError counts only once that module is
    loaded: an error of a module never imported cannot have been raised."""
    from mdbench.data.errors import DataError
    from mdbench.paper_yaml import PaperFileError
    from mdbench.runner import RunnerError
    from mdbench.runs import RunsError

    results = sys.modules.get("mdbench.results")
    return (RunnerError, DataError, PaperFileError, RunsError, OSError,
            *([results.RecordError] if results else []))


def main(argv: list[str] | None = None) -> int:
    """Run ``mdbench`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        if not isinstance(err, _one_line_errors()):
            raise
        print(f"mdbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the notebook runs, which reproduce handles itself
        print("\nmdbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

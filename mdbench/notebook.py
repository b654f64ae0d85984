"""What every paper notebook does around its experiment, written once.

.. code-block:: python

    session = notebook.start("efcm", notebook.parameters(globals()), efcm.Config)   # setup cell
    run = efcm.run(data, features, cfg, work=session.work)                           # units of work, resumable
    session.record_frame("table1", frame, dataset=..., dataset_checksum=..., config=...)
    tables = session.tables()                                                       # results cell: all tables
    session.save_figure(fig, "pareto")
    notebook.finish(session)                                                         # claims cell

:func:`start` seeds, sets deterministic kernels (off only at the ``gpu`` profile, where speed matters more), the
torch thread count (a ``threads`` parameter), opens the result store and the cache of the run's units of work
(``session.work``, :mod:`mdbench.work`; a ``resume`` parameter loads the units a former run stored) and prints what
this machine is;
:func:`finish` judges the paper's claims on the records and prints them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from mdbench import figures, repro, results, verdicts
from mdbench import samples as sample_outputs
from mdbench.params import MACHINE_FIELDS, SELECTORS, NotebookConfig
from mdbench.work import Work, WorkCache, uncached

# parameters the session consumes; every other parameter belongs to the paper's Config
SESSION_PARAMS = ("profile", "threads", "resume")
_NOT_PARAMETERS = {"In", "Out"}  # IPython's history, in every kernel's namespace
_PARAMETER_TYPES = (type(None), bool, int, float, str, list, tuple, dict)


def parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The notebook's parameters out of its global namespace: every public plain value (None, bool, number,
    string, list, dict). Call it in the first cell after the parameters cell, before that cell assigns any such
    value (imports are fine), so that only the parameters (and those papermill injected) are there."""
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and name not in _NOT_PARAMETERS and isinstance(value, _PARAMETER_TYPES)}


@dataclass
class Session:
    """One notebook run: its paper and profile, the paper's ``config`` (None for a walkthrough without one), the
    result store, the environment fingerprint and ``work``, through which the experiment runs its units of work
    (:class:`mdbench.work.WorkCache` under ``store.dir / "work"``; :func:`mdbench.work.uncached` by default)."""

    paper: str
    profile: str
    config: Any
    store: results.ResultStore
    deterministic: bool
    fingerprint: dict[str, Any]
    work: Work = field(default=uncached)

    def record_frame(self, table: str, frame: pd.DataFrame, *, dataset: str | None = None,
                     dataset_checksum: str | None = None, config: dict[str, Any] | None = None, unit: str = "",
                     notes: str = "", samples: pd.DataFrame | None = None, classification_scale: float = 100.0,
                     aggregate: str = sample_outputs.MEAN) -> None:
        """One record per (dataset, row, metric) of a long frame, its values in the frame's order.

        ``frame`` has columns ``row``, ``metric``, ``value`` and optionally ``seed`` (absent: one measurement,
        seed 0) and any of ``dataset``, ``dataset_checksum``, ``config``, ``unit``, ``notes``, which win over the
        keyword arguments of the same name (first line of each group).

        ``samples``: the per-sample outputs the values were aggregated from (:mod:`mdbench.samples`), with a
        ``row`` column (and ``dataset`` where the frame has several): per-unit ``metric, value`` lines, whose mean
        (or median, with ``aggregate="median"``: timing repeats) is the record's value, or classifier outputs
        ``label, prob_*``, whose accuracy/AUC/… times ``classification_scale`` is. They are written beside the
        records, which point to them; each row's file is read back once and checked against its records.
        """
        if aggregate not in sample_outputs.PER_UNIT:
            raise ValueError(f"aggregate must be one of {list(sample_outputs.PER_UNIT)}, got {aggregate!r}")
        missing = {"row", "metric", "value"} - set(frame.columns)
        if missing:
            raise ValueError(f"record_frame needs columns row, metric, value; {sorted(missing)} missing")
        defaults = {"dataset": dataset, "dataset_checksum": dataset_checksum, "config": config, "unit": unit,
                    "notes": notes}
        frame = frame.assign(**{k: [v] * len(frame) for k, v in defaults.items() if k not in frame.columns})
        if "seed" not in frame.columns:
            frame = frame.assign(seed=0)
        for key in ("dataset", "dataset_checksum", "config"):
            if frame[key].isna().any():
                raise ValueError(f"record_frame needs a {key}: pass it or give the frame a {key} column")
        if samples is not None and "row" not in samples.columns:
            raise ValueError("record_frame's samples need a row column")
        for (data_name, row), lines in frame.groupby(["dataset", "row"], sort=False):
            refs, written = self._write_samples(table, data_name, row, samples, classification_scale, aggregate)
            for metric, group in lines.groupby("metric", sort=False):
                first = group.iloc[0]
                self.store.record(table, row, metric, [float(v) for v in group["value"]],
                                  seeds=[int(s) for s in group["seed"]], dataset=data_name,
                                  dataset_checksum=first["dataset_checksum"], config=first["config"],
                                  unit=first["unit"], notes=first["notes"], samples=refs(metric),
                                  sample_lines=written)

    def _write_samples(self, table: str, dataset: str, row: str, samples: pd.DataFrame | None, scale: float,
                       aggregate: str):
        """Write the lines of ``samples`` that belong to (dataset, row); returns metric -> SamplesRef or None, and
        the file as read back (None where nothing was written)."""
        if samples is None:
            return (lambda metric: None), None
        own = samples[samples["row"] == row]
        if "dataset" in own.columns:
            own = own[own["dataset"] == dataset]
        if own.empty:
            return (lambda metric: None), None
        # a frame concatenated over datasets of different class counts has prob_k columns that are empty here
        own = own.drop(columns=["row", "dataset"], errors="ignore").dropna(axis=1, how="all")
        name = self.store.write_samples(table, dataset, row, own)
        written = sample_outputs.read(self.store.records_dir / name)
        if "value" in own.columns:
            have = set(own["metric"])
            return (lambda metric: sample_outputs.SamplesRef(name, aggregate) if metric in have else None), written
        return (lambda metric: (sample_outputs.SamplesRef(name, metric, scale)
                                if metric in sample_outputs.CLASSIFICATION else None)), written

    def tables(self) -> dict[str, pd.DataFrame]:
        """Build every table of the paper (those its paper.yaml reports, with its ``digits``) from the records and
        per-sample outputs on disk, save each (CSV and Markdown) and return them by name
        (:func:`mdbench.results.save_tables`, which ``mdbench tables`` runs too)."""
        return results.save_tables(self.store)

    def save_table(self, frame: pd.DataFrame, name: str) -> pd.DataFrame:
        """Save a view derived from the tables (e.g. a wide one) beside them; returns it for display."""
        self.store.save_table(frame, name)
        return frame

    def save_figure(self, fig, name: str) -> None:
        self.store.save_figure(fig, name)


def start(paper: str, params: Mapping[str, Any], config_type: type[NotebookConfig] | None = None, *,
          packages: Sequence[str] = ("torch",)) -> Session:
    """Set up a notebook run from its parameters (:func:`parameters`).

    Seeds every RNG with the first seed, turns deterministic kernels on unless the profile is ``gpu``, sets the
    torch thread count to ``threads`` where given, opens ``ResultStore(paper, profile)`` and the cache of the units
    of work beside it (loading stored units where ``resume`` is true; the units' config is the Config's
    ``work_config()``, or the parameters but the session's, the machine's and ``seeds`` without a Config), prints a
    one-line banner (``packages``' versions, cores, threads, GPU, git commit), sets the figure style
    (:func:`mdbench.figures.apply_style`) and builds ``config_type.from_params``
    of every parameter but ``profile``, ``threads`` and ``resume``.
    """
    profile = params["profile"]
    if params.get("threads"):
        torch.set_num_threads(int(params["threads"]))
    config = None
    if config_type is not None:
        config = config_type.from_params({k: v for k, v in params.items() if k not in SESSION_PARAMS})
        work_config = config.work_config()
    else:
        work_config = {k: v for k, v in params.items() if k not in (*SESSION_PARAMS, *MACHINE_FIELDS, *SELECTORS)}
    deterministic = profile != "gpu"
    seeds = params.get("seeds") or [0]
    repro.seed_everything(seeds[0], deterministic=deterministic)
    fp = repro.fingerprint()
    versions = ", ".join(f"{name} {fp['packages'].get(name, '?')}" for name in packages)
    print(f"{versions}; {fp['hardware']['cpu_count']} CPU cores, {torch.get_num_threads()} threads, "
          f"GPU: {fp['hardware']['gpu'] or 'none'}; git {fp['git']['commit'][:8]} (dirty: {fp['git']['dirty']})")
    figures.apply_style()
    store = results.ResultStore(paper, profile)
    work = WorkCache(store.dir / "work", work_config, resume=bool(params.get("resume")))
    return Session(paper, profile, config, store, deterministic, fp, work)


def finish(session: Session) -> pd.DataFrame:
    """Judge the paper's claims on the records and their per-sample outputs (:func:`mdbench.verdicts.judge_store`),
    save them as the ``claims`` table and print one line each (:func:`mdbench.verdicts.claim_lines`): the verdict,
    the mean paired difference with its BH-adjusted interval, n and the test. Returns the claims frame."""
    claims, lines = verdicts.judge_store(session.store)
    print("\n".join(lines))
    return claims

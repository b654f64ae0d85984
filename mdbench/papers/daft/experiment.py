"""DAFT experiment glue: the notebook's steps as calls, and Table A (every row's models run on the test cases with
their routes, and averaged).

This module wires DAFT's helpers together, one function per step of ``notebooks/daft.ipynb``: :class:`Config`,
:func:`load_data` (:mod:`~mdbench.papers.daft.cases`), :func:`model_costs`, :func:`baseline`, :func:`fit_routers`
(:mod:`~.routing`), :func:`lineages` (per seed, :func:`lineage`: KD, general and data-aware fine-tuning through
:mod:`~.training`, and the seed's rows of Table A through :mod:`~.inference` and :mod:`~.evaluation`; each seed a
unit of work that a resumed run loads), :func:`run` (Table A), :func:`deploy` and :func:`time_cases` (:mod:`~.deploy`:
export, runtime, fresh-process timing), the ``record_*`` functions and the ``plot_*`` figures.

:class:`CaseEvaluator` segments each (model, case) pair once and reuses it for every row of Table A that routes
that case to that model (e.g. DAFT sends an unseen modality to the general model, whose masks are already known).
A case that cannot be segmented or scored is reported in the ``error`` column and the batch goes on (unreadable
files are skipped before, by :func:`mdbench.papers.daft.cases.read_cases`).

Averages follow the challenge leaderboard (:func:`~mdbench.papers.daft.evaluation.modality_summary`): the mean over
cases per modality, then the mean over modalities. Each ``record_*`` function returns the records and the per-sample
lines behind them (:mod:`mdbench.samples`) for ``Session.record_frame(..., samples=...)``: per test case (Table A's
DSC / NSD, Table B's seconds, the router's agreement) or per test image and slice (the embedding MSE).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mdbench import efficiency, figures, repro
from mdbench.data.synthetic import write_synthetic_boxprompt_cases
from mdbench.models.efficientvit_sam import build_efficientvit_sam
from mdbench.models.litemedsam import LiteMedSAM
from mdbench.papers.daft import cases as daft_cases
from mdbench.papers.daft import training as daft_training
from mdbench.papers.daft.deploy import timing
from mdbench.papers.daft.evaluation import case_lines, modality_summary, score_case, summary_metrics
from mdbench.papers.daft.inference import Predictor, segment_case
from mdbench.papers.daft.routing import GENERAL, FileNameRouter, LearnedRouter
from mdbench.params import NotebookConfig
from mdbench.train import History
from mdbench.work import Work, uncached

__all__ = ["ROWS", "CaseEvaluator", "Cases", "Config", "KDSet", "Lineage", "Lineages", "Routers", "TableA", "Timings",
           "baseline", "build_student", "deploy", "evaluate_seed", "expert_subsets", "fit_routers", "kd_set", "lineage",
           "lineages", "load_data", "model_costs", "plot_curves", "plot_overlays", "plot_scores", "record_figures", "record_kd", "record_routers",
           "record_table_a", "record_table_b", "run", "shown_cases", "time_cases", "timed_cases", "wide_table_a"]

log = logging.getLogger(__name__)
COLUMNS = ["case", "modality", "model", "dsc", "nsd", "seconds", "error"]


class CaseEvaluator:
    """Segment and score cases with named models, each (model, case) pair once.

    Cases are segmented one after another (on the model's device) while threads score the ones already segmented:
    the challenge's NSD is a surface-distance search on the CPU (about 50 ms a 2D case, benchmarks/daft_scoring.py),
    which, done in turn, kept the GPU waiting for some 40 s of each seed's Table A rows. The scores do not depend on
    the threads.

    Args:
        models: model name -> predictor (see :mod:`mdbench.papers.daft.inference`).
        cache_embeddings: embed each 3D slice once (same masks as without, fewer encoder calls).
        batch_slices: with the cache, embed a volume's slices in batches (same masks up to rounding, fewer launches;
            :func:`~mdbench.papers.daft.inference.segment_case`).
        workers: scoring threads (default: the CPU count, at most 16).
    """

    def __init__(self, models: Mapping[str, Predictor], cache_embeddings: bool = True, batch_slices: bool = True,
                 workers: int | None = None) -> None:
        self.models = dict(models)
        self.cache_embeddings, self.batch_slices = cache_embeddings, batch_slices
        self.workers = workers or min(16, os.cpu_count() or 1)
        self._rows: dict[tuple[str, str], dict] = {}
        self.predictions: dict[tuple[str, str], np.ndarray] = {}

    def _segmented(self, model: str, case: dict) -> tuple[dict, np.ndarray | None]:
        """The pair's row with its segmentation ``seconds`` (or its error), and the label map (None on error)."""
        row = {"case": case["name"], "modality": case.get("modality") or "unknown", "model": model,
               "dsc": np.nan, "nsd": np.nan, "seconds": np.nan, "error": ""}
        try:
            start = time.perf_counter()
            labels = segment_case(self.models[model], case, self.cache_embeddings, self.batch_slices)
        except ValueError as err:  # an unscorable case is reported in its row
            return _failed(row, err), None
        row["seconds"] = time.perf_counter() - start
        self.predictions[(model, case["name"])] = labels
        return row, labels

    def evaluate(self, cases: Sequence[dict], route: Callable[[dict], str] | str,
                 progress: bool = False) -> pd.DataFrame:
        """One row per case: the model ``route(case)`` picks (or the one named), its DSC, NSD (%), seconds, error."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        choose = (lambda case: route) if isinstance(route, str) else route
        keys = []
        # here, not in each scoring thread: catch_warnings swaps the process's filters and is not thread-safe
        with warnings.catch_warnings(), ThreadPoolExecutor(self.workers, thread_name_prefix="score") as pool:
            warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.")  # labels absent from a mask
            scoring = {}
            for case in tqdm(cases, desc="cases", disable=not progress, leave=False):
                model = choose(case)
                if model not in self.models:
                    raise KeyError(f"router chose model {model!r} for {case['name']}; known: {sorted(self.models)}")
                key = (model, case["name"])
                keys.append(key)
                if key not in self._rows and key not in scoring:
                    scoring[key] = pool.submit(_scored, *self._segmented(model, case), case)
            self._rows.update({key: future.result() for key, future in scoring.items()})
        return pd.DataFrame([self._rows[key] for key in keys], columns=COLUMNS)


def _failed(row: dict, err: ValueError) -> dict:
    row["error"] = str(err)
    log.warning("case %s with model %s: %s", row["case"], row["model"], err)
    return row


def _scored(row: dict, labels: np.ndarray | None, case: dict) -> dict:
    """``row`` with the DSC and NSD of ``labels`` (left as it is where segmentation failed)."""
    if labels is None:
        return row
    try:
        return {**row, **score_case(labels, case)}
    except ValueError as err:
        return _failed(row, err)


# ------------------------------------------------------------------------------------------------- the notebook
ROWS = ["LiteMedSAM", "KD only", "+ general FT", "+ DAFT (file-name router)", "+ DAFT (learned router)"]


@dataclass(frozen=True)
class Config(NotebookConfig):
    """The notebook's parameters: the cases, the student, KD, general and data-aware fine-tuning, Table B's timing."""

    device: str = "cpu"                 # training and Table A inference (Table B is always timed on the CPU)
    seeds: tuple[int, ...] = (0,)       # one KD -> FT -> DAFT lineage per seed
    data_dir: str | None = None
    dataset: str = "real"               # synthetic | real (Kvasir-SEG, ISIC 2017, HC18, MSD hippocampus)
    cases_dir: str | None = None        # or any folder of challenge .npz cases
    n_cases: dict = field(default_factory=lambda: {"train": 40, "val": 4, "test": 3})  # per modality and split (real: None = all)
    synthetic_kinds: tuple[str, ...] = ("2DBox_Endoscopy", "2DBox_Dermoscopy", "2DBox_US", "3DBox_MR")
    synthetic_image_size: tuple[int, int] = (160, 160)
    synthetic_volume_shape: tuple[int, int, int] = (8, 64, 64)
    experts: tuple[str, ...] = ("Endoscopy", "Dermoscopy", "3D")  # other modalities go to the general model
    student_backbone: str = "efficientvit_l1"
    student_depths: tuple[int, ...] = (1, 1, 1, 4, 4)  # () keeps timm's
    neck_width: int = 256
    neck_depth: int = 4
    neck_block: str = "fmbconv"
    student_pretrained: bool = False
    teacher_backend: str = "torch"      # torch | openvino
    kd_images: int | None = None        # at most this many KD inputs (None: all training images + slices)
    kd_slices_per_volume: int = 4
    kd_epochs: int = 20
    kd_lr: float = 5e-4
    kd_batch: int = 16
    kd_patience: int | None = None      # KD stops when its held-out embedding MSE (val cases) has flattened (None: all kd_epochs, no held-out set)
    kd_min_delta: float = 0.0           # ... that is, improved by less than this fraction of its best for kd_patience epochs
    ft_epochs: int = 15
    ft_lr: float = 1e-4
    ft_batch: int = 32
    patience: int = 7
    workers: int = 0
    amp: bool = False                   # bf16 autocast in KD and fine-tuning (CUDA only)
    channels_last: bool = False         # the student encoder in channels-last layout (CUDA only)
    compile: bool = False               # the student encoder torch.compile'd in KD and fine-tuning (CUDA only)
    on_device: bool = False             # KD inputs / targets and a prompt bank of the fine-tuning items on the device
    daft_epochs: int = 6
    daft_slices_per_volume: int | None = 10
    timing_per_modality: int = 1        # test cases per modality timed in Table B (0: none)
    timing_modalities: tuple[str, ...] | None = None
    timing_threads: int | None = None   # threads of the timed processes (None: all cores)

    @property
    def speed(self) -> daft_training.Speed:
        """How the student trains (:class:`~mdbench.papers.daft.training.Speed`)."""
        return daft_training.Speed(amp=self.amp, channels_last=self.channels_last, compile=self.compile,
                                   on_device=self.on_device)

    @property
    def student(self) -> dict[str, Any]:
        """:func:`build_efficientvit_sam` arguments of the student (recorded as ``student``)."""
        return {"backbone": self.student_backbone, "depths": list(self.student_depths) or None,
                "neck_width": self.neck_width, "neck_depth": self.neck_depth, "neck_block": self.neck_block,
                "pretrained": self.student_pretrained}


def build_student(teacher: LiteMedSAM, cfg: Config) -> LiteMedSAM:
    """The EfficientViT student encoder merged with the teacher's prompt encoder and mask decoder."""
    return build_efficientvit_sam(teacher, **cfg.student)


@dataclass
class Cases:
    """The challenge cases of one run: the dataset's ``name``, each split's ``paths`` and read ``cases``, the
    unreadable files skipped (``errors``, name -> reason) and a ``checksum`` of every case read."""

    name: str
    paths: dict[str, list[Path]]
    cases: dict[str, list[dict]]
    errors: dict[str, str]
    checksum: str

    @property
    def train(self) -> list[dict]:
        return self.cases["train"]

    @property
    def val(self) -> list[dict]:
        return self.cases["val"]

    @property
    def test(self) -> list[dict]:
        return self.cases["test"]

    def counts(self) -> pd.DataFrame:
        """Cases per modality (rows) and split (columns)."""
        return pd.DataFrame({split: pd.Series([c["modality"] for c in cs]).value_counts()
                             for split, cs in self.cases.items()}).fillna(0).astype(int)


def load_data(cfg: Config, work: Path) -> Cases:
    """The run's cases: ``cfg.cases_dir`` as it is, or real (``dataset="real"``, converted by
    :func:`~mdbench.papers.daft.cases.write_real_cases`) or synthetic cases written to ``work/cases``."""
    if cfg.cases_dir is not None:
        folder, name = Path(cfg.cases_dir), Path(cfg.cases_dir).name
    elif cfg.dataset == "real":
        folder, name = work / "cases", "real"
        daft_cases.write_real_cases(folder, cfg.n_cases, data_dir=cfg.data_dir)
    else:
        folder, name = work / "cases", "synthetic"
        if None in cfg.n_cases.values():
            raise ValueError(f"n_cases {cfg.n_cases}: None (all cases) is for real data; synthetic cases need a count")
        for split, n in cfg.n_cases.items():
            write_synthetic_boxprompt_cases(folder / split, n, seed=0, split=split, kinds=list(cfg.synthetic_kinds),
                                            image_size=(*cfg.synthetic_image_size,),
                                            volume_shape=(*cfg.synthetic_volume_shape,))
    paths = daft_cases.case_splits(folder)
    read = {split: daft_cases.read_cases(paths[split]) for split in ("train", "val", "test")}
    cases = {split: found for split, (found, _) in read.items()}
    errors = {name: reason for _, errs in read.values() for name, reason in errs.items()}
    checksum = daft_cases.cases_checksum(cases["train"] + cases["val"] + cases["test"])
    return Cases(name, paths, cases, errors, checksum)


def model_costs(models: Mapping[str, LiteMedSAM], cfg: Config) -> pd.DataFrame:
    """Parameters (whole model and image encoder, M) and the encoder's GFLOPs on a 256x256 image of each model,
    as records (``row``, ``metric``, ``value``, ``unit``, ``config``) with the encoder's ``init``."""
    example = torch.rand(1, 3, 256, 256)
    lines = []
    for row, model in models.items():
        params = efficiency.count_parameters(model)
        encoder = efficiency.count_parameters(model.image_encoder)
        flops = efficiency.count_flops(model.image_encoder, example).flops
        init = getattr(model.image_encoder, "mdbench_init", model.mdbench_init)
        config = {"model": row, "student": cfg.student if row != "LiteMedSAM" else None,
                  "input_shape": "1x3x256x256"}
        for metric, value, unit in [("params_m", params.total / 1e6, "M"),
                                    ("encoder_params_m", encoder.total / 1e6, "M"),
                                    ("encoder_gflops", flops / 1e9, "GFLOPs")]:
            lines.append({"row": row, "metric": metric, "value": value, "unit": unit, "config": config,
                          "init": init})
    return pd.DataFrame(lines)


def baseline(teacher: LiteMedSAM, cases: Cases, cfg: Config, work: Path
             ) -> tuple[Predictor, Callable, dict[str, Any] | None]:
    """The LiteMedSAM baseline predictor, the encoder that computes the KD targets, and the OpenVINO parity
    report (None with ``teacher_backend="torch"``): with ``"openvino"`` the teacher runs through its export,
    after a parity check against PyTorch on a real image."""
    if cfg.teacher_backend != "openvino":
        return teacher.to(cfg.device), teacher.image_encoder.to(cfg.device), None
    import openvino as ov

    from mdbench.papers.daft.deploy.export import export_openvino
    from mdbench.papers.daft.deploy.runtime import OpenVinoSAM

    parity = export_openvino(teacher, work / "teacher", example_image=cases.train[0]["imgs"])
    model = OpenVinoSAM(work / "teacher", ov.Core())
    return model, model.encode, parity


@dataclass
class KDSet:
    """The KD inputs (N, 3, 256, 256), their N names (``<case>`` or ``<case>@z<slice>``) and the teacher's (N, 256, 64,
    64) embeddings of them as ``targets``, computed on first use (a run whose lineages are all stored needs none)."""

    inputs: torch.Tensor
    names: list[str]
    encode: Callable
    device: str

    @cached_property
    def targets(self) -> torch.Tensor:
        return daft_training.embed_images(self.encode, self.inputs, device=self.device)


def kd_set(teacher_encode: Callable, cases: Cases, cfg: Config, split: str = "train") -> KDSet:
    """The images and slices of ``split``'s cases: the training ones KD distils on (at most ``kd_images``, drawn
    with a fixed seed), the validation ones whose embedding MSE tells when KD has flattened, or the test ones it is
    reported on (all of them)."""
    inputs, names = daft_training.encoder_inputs(cases.cases[split], slices_per_volume=cfg.kd_slices_per_volume)
    if split == "train" and cfg.kd_images is not None and len(inputs) > cfg.kd_images:
        picks = np.random.default_rng(0).permutation(len(inputs))[:cfg.kd_images]
        inputs, names = inputs[picks], [names[i] for i in picks]
    return KDSet(inputs, names, teacher_encode, cfg.device)


def expert_subsets(cases: Cases, cfg: Config) -> dict[str, tuple[list[dict], list[dict]]]:
    """Expert name -> (train, val) cases the file-name router sends to it, for the experts with training cases."""
    router = FileNameRouter(list(cfg.experts))
    subsets = {name: ([c for c in cases.train if router.route(c["name"]) == name],
                      [c for c in cases.val if router.route(c["name"]) == name]) for name in cfg.experts}
    return {name: split for name, split in subsets.items() if split[0]}


@dataclass
class Lineage:
    """What one seed's KD -> general FT -> DAFT lineage keeps (a unit of work): the embedding MSE of each test image
    and slice ``before KD`` and ``after KD`` (``kd_mse``, (N,) each), the training ``curves`` (one frame per run, one
    row per epoch, with ``seed`` and ``stage``: general FT, each DAFT expert's, then KD's), Table A's rows of the
    seed (``per_case``, :meth:`CaseEvaluator.evaluate`'s columns with ``row`` and ``seed``), the masks
    (``predictions[(model, case)]``) and the CPU ``models`` (``"+ general FT"`` and ``"experts"``) that the
    deployment, Table B and the figures use: those of the first seed only."""

    kd_mse: dict[str, np.ndarray]
    curves: list[pd.DataFrame]
    per_case: pd.DataFrame
    predictions: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lineages:
    """Every seed's :class:`Lineage` (``by_seed``) and what they share: ``config``, what decided them (recorded with
    their numbers), the names of the test images and slices KD's embedding MSE is measured on (``kd_units``) and
    each expert's (train, val) cases (``subsets``)."""

    by_seed: dict[int, Lineage]
    config: dict[str, Any]
    kd_units: list[str] = field(default_factory=list)
    subsets: dict[str, tuple[list[dict], list[dict]]] = field(default_factory=dict)

    @property
    def models(self) -> dict[int, dict[str, Any]]:
        """Seed -> the models its lineage kept (the first seed's deployed ones)."""
        return {seed: lineage.models for seed, lineage in self.by_seed.items() if lineage.models}

    @property
    def curves(self) -> list[pd.DataFrame]:
        return [curve for lineage in self.by_seed.values() for curve in lineage.curves]

    def curves_frame(self) -> pd.DataFrame:
        """Every training's epochs in one frame (``stage``, ``seed``, ``epoch``, ``train_loss``, ``val_loss``,
        ``kept``, ``lr``, ``seconds``, and the fine-tuning loss terms), KD first."""
        frame = pd.concat(self.curves, ignore_index=True)
        order = ["KD", "general FT", *sorted(s for s in frame.stage.unique() if s.startswith("DAFT "))]
        frame = frame.sort_values(["stage", "seed", "epoch"], key=lambda c: c.map(order.index) if c.name == "stage"
                                  else c, kind="stable", ignore_index=True)
        first = ["stage", "seed", "epoch", "train_loss", "val_loss", "kept"]
        return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]

    @property
    def kd_mse(self) -> dict[str, dict[int, np.ndarray]]:
        """Row (``before KD`` / ``after KD``) -> seed -> (N,) MSE of each test image and slice."""
        rows = next(iter(self.by_seed.values())).kd_mse if self.by_seed else {}
        return {row: {seed: lineage.kd_mse[row] for seed, lineage in self.by_seed.items()} for row in rows}


def timed_cases(cases: Cases, cfg: Config) -> list[dict]:
    """The test cases Table B times: the first ``timing_per_modality`` of each of ``timing_modalities``."""
    return [c for modality in sorted({c["modality"] for c in cases.test})
            if cfg.timing_modalities is None or modality in cfg.timing_modalities
            for c in [c for c in cases.test if c["modality"] == modality][:cfg.timing_per_modality]]


def shown_cases(cases: Cases) -> list[dict]:
    """The test case per modality that :func:`plot_overlays` shows (the last one of each)."""
    return list({c["modality"]: c for c in cases.test}.values())


def evaluate_seed(models: Mapping[str, Any], routers: Routers, cases: Cases, seed: int
                  ) -> tuple[pd.DataFrame, CaseEvaluator]:
    """Table A's rows of one seed's models (``"KD only"``, ``"+ general FT"`` and ``"experts"``, name -> model) on
    the test cases, both routers' DAFT rows included, and the evaluator that holds their masks."""
    evaluator = CaseEvaluator({"KD only": models["KD only"], GENERAL: models["+ general FT"], **models["experts"]})
    routes: dict[str, str | Callable[[dict], str]] = {
        "KD only": "KD only", "+ general FT": GENERAL,
        "+ DAFT (file-name router)": lambda c: routers.file_name.route(c["name"]),
        "+ DAFT (learned router)": lambda c: routers.routes[c["name"]]}
    frames = [evaluator.evaluate(cases.test, route).assign(row=row, seed=seed) for row, route in routes.items()]
    return pd.concat(frames, ignore_index=True), evaluator


def _curve(history: History, seed: int, stage: str) -> pd.DataFrame:
    """One training's epochs (:meth:`~mdbench.train.History.to_frame`) with its ``seed``, ``stage`` and ``kept``:
    whether the weights it ended with are that epoch's (the best held-out loss where it watched one, which
    early stopping restored; else the last epoch)."""
    frame = history.to_frame()
    kept = history.best_epoch if "val_loss" in frame else len(frame)
    return frame.assign(seed=seed, stage=stage, kept=frame.epoch == kept)


def lineage(seed: int, teacher: LiteMedSAM, kd: KDSet, kd_val: KDSet | None, kd_test: KDSet, routers: Routers,
            cases: Cases, cfg: Config, deterministic: bool) -> Lineage:
    """One seed: a student whose image encoder is distilled into the teacher's embeddings of the KD inputs (step 1;
    with ``kd_val``, until the embedding MSE of those held-out inputs flattens; its MSE before and after is that of
    the test images and slices ``kd_test``, which neither KD nor its stopping saw), a copy fine-tuned on all training
    cases (step 2, ``"+ general FT"``), one copy of that per expert fine-tuned on the cases the file-name router
    sends to it (step 3, DAFT proper), and Table A's rows of these models."""
    repro.seed_everything(seed, deterministic=deterministic)
    model = build_student(teacher, cfg)
    encoder = model.image_encoder
    kd_mse = {"before KD": daft_training.embedding_mse(encoder, kd_test.inputs, kd_test.targets, device=cfg.device)}
    held_out: dict[str, Any] = {} if kd_val is None else {
        "val_images": kd_val.inputs, "val_targets": kd_val.targets, "patience": cfg.kd_patience,
        "min_delta": cfg.kd_min_delta}
    kd_history = daft_training.distill_encoder(encoder, kd.inputs, kd.targets, epochs=cfg.kd_epochs, lr=cfg.kd_lr,
                                               batch_size=cfg.kd_batch, speed=cfg.speed, device=cfg.device,
                                               seed=seed, **held_out)
    kd_mse["after KD"] = daft_training.embedding_mse(encoder, kd_test.inputs, kd_test.targets, device=cfg.device)

    general = build_student(teacher, cfg)
    general.load_state_dict(model.state_dict())
    finetuning: dict[str, Any] = {"lr": cfg.ft_lr, "batch_size": cfg.ft_batch, "patience": cfg.patience,
                                  "num_workers": cfg.workers, "speed": cfg.speed, "device": cfg.device, "seed": seed}
    history = daft_training.finetune(general, cases.train, cases.val, epochs=cfg.ft_epochs, **finetuning)
    curves = [_curve(history, seed, "general FT")]
    tuned = daft_training.data_aware_finetune(general, expert_subsets(cases, cfg), epochs=cfg.daft_epochs,
                                              max_slices_per_volume=cfg.daft_slices_per_volume, **finetuning)
    experts = {name: expert for name, (expert, _) in tuned.items()}
    curves += [_curve(h, seed, f"DAFT {name}") for name, (_, h) in tuned.items()]
    curves.append(_curve(kd_history, seed, "KD"))

    per_case, evaluator = evaluate_seed({"KD only": model, "+ general FT": general, "experts": experts}, routers,
                                        cases, seed)
    if seed != cfg.seeds[0]:
        return Lineage(kd_mse, curves, per_case)
    routes = {c["name"]: routers.file_name.route(c["name"]) for c in shown_cases(cases) + timed_cases(cases, cfg)}
    predictions = {key: labels for key, labels in evaluator.predictions.items() if routes.get(key[1]) == key[0]}
    needed = {routers.file_name.route(c["name"]) for c in timed_cases(cases, cfg)}  # what deploy() exports
    deployed = {name: expert.cpu() for name, expert in experts.items() if name in needed}
    return Lineage(kd_mse, curves, per_case, predictions, {"+ general FT": general.cpu(), "experts": deployed})


def lineages(teacher: LiteMedSAM, teacher_encode: Callable, routers: Routers, cases: Cases, cfg: Config,
             deterministic: bool, work: Work = uncached) -> Lineages:
    """Every seed's :func:`lineage`, each a unit of ``work``; KD's targets are the teacher's embeddings
    (``teacher_encode``) of the training images and slices (:func:`kd_set`), and with ``kd_patience`` those of
    the validation images and slices tell when KD has flattened; those of the test ones are what its embedding
    MSE is reported on."""
    kd = kd_set(teacher_encode, cases, cfg)
    kd_val = kd_set(teacher_encode, cases, cfg, "val") if cfg.kd_patience is not None else None
    kd_test = kd_set(teacher_encode, cases, cfg, "test")
    subsets = expert_subsets(cases, cfg)
    config = {"student": cfg.student, "images": len(kd.inputs), "mse_images": len(kd_test.inputs),
              "epochs": cfg.kd_epochs, "lr": cfg.kd_lr, "batch": cfg.kd_batch, "teacher_backend": cfg.teacher_backend,
              "ft_epochs": cfg.ft_epochs, "ft_lr": cfg.ft_lr, "ft_batch": cfg.ft_batch, "patience": cfg.patience,
              "experts": sorted(subsets), "daft_epochs": cfg.daft_epochs,
              "daft_slices_per_volume": cfg.daft_slices_per_volume}
    # what only some profiles set is recorded where set, so that the records of the others stay as they were
    if kd_val is not None:
        config.update({"kd_patience": cfg.kd_patience, "kd_min_delta": cfg.kd_min_delta,
                       "kd_val_images": len(kd_val.inputs)})
    config.update({name: True for name, on in asdict(cfg.speed).items() if on})
    by_seed = {seed: work("lineage", partial(lineage, seed, teacher, kd, kd_val, kd_test, routers, cases, cfg,
                                             deterministic), seed=seed) for seed in cfg.seeds}
    return Lineages(by_seed, config, kd_test.names, subsets)


def record_kd(lineages: Lineages) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per row (before / after KD) and seed, the embedding MSE over the test images and slices as records, and the
    MSE of each (unit: its name) that it is the mean of."""
    records = pd.DataFrame([{"row": row, "seed": seed, "metric": "embedding_mse", "value": float(np.mean(errors))}
                            for row, by_seed in lineages.kd_mse.items() for seed, errors in by_seed.items()])
    samples = pd.concat([pd.DataFrame({"row": row, "seed": seed, "unit": lineages.kd_units, "metric": "embedding_mse",
                                       "value": errors})
                         for row, by_seed in lineages.kd_mse.items() for seed, errors in by_seed.items()],
                        ignore_index=True)
    return records.assign(config=[lineages.config] * len(records)), samples


ROUTER_SCORES = ("accuracy", "accuracy_seen", "fallback_unseen")


@dataclass
class Routers:
    """The file-name router, the learned one (trained on ``train_cases`` cases) and both routes of every test case;
    ``outcomes``: per test case (``unit``) and score (``metric``), 100 where the learned router did right, else 0:
    ``accuracy`` (it agrees with the file name), ``accuracy_seen`` (the same, on the expert modalities),
    ``fallback_unseen`` (another modality sent to the general model)."""

    file_name: FileNameRouter
    learned: LearnedRouter
    oracle: dict[str, str]
    routes: dict[str, str]
    outcomes: pd.DataFrame
    train_cases: int

    @property
    def scores(self) -> dict[str, float]:
        """Each score (%) over its cases, nan for a score without cases."""
        means = self.outcomes.groupby("metric")["value"].mean()
        return {metric: float(means.get(metric, np.nan)) for metric in ROUTER_SCORES}


def fit_routers(cases: Cases, cfg: Config) -> Routers:
    """Fit the learned router on the train and validation images of the expert modalities and route the test
    cases with both routers; score the learned routes against the file names (:class:`Routers`)."""
    file_router = FileNameRouter(list(cfg.experts))
    known = [c for c in cases.train + cases.val if file_router.route(c["name"]) != GENERAL]
    learned_router = LearnedRouter().fit([c["imgs"] for c in known], [file_router.route(c["name"]) for c in known])
    oracle = {c["name"]: file_router.route(c["name"]) for c in cases.test}
    learned = dict(zip(oracle, learned_router.route_many([c["imgs"] for c in cases.test]), strict=True))
    outcomes = []
    for name, expert in oracle.items():
        agrees = 100.0 * (learned[name] == expert)
        outcomes.append({"unit": name, "metric": "accuracy", "value": agrees})
        if expert != GENERAL:
            outcomes.append({"unit": name, "metric": "accuracy_seen", "value": agrees})
        else:
            outcomes.append({"unit": name, "metric": "fallback_unseen", "value": 100.0 * (learned[name] == GENERAL)})
    return Routers(file_router, learned_router, oracle, learned, pd.DataFrame(outcomes), len(known))


def record_routers(routers: Routers, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The learned router's scores (%) as records (a score without cases is not recorded), and the per-case
    outcomes they are the means of."""
    config = {"experts": list(cfg.experts), "train_cases": routers.train_cases}
    records = pd.DataFrame([{"row": "learned router", "metric": metric, "value": value, "config": config}
                            for metric, value in routers.scores.items() if not np.isnan(value)])
    return records, routers.outcomes.assign(row="learned router", seed=0)


@dataclass
class TableA:
    """Every (row, seed, case) score (``per_case``) and, per seed, the masks kept (``predictions[seed][(model,
    case)]``: the first seed's of the cases shown and timed)."""

    per_case: pd.DataFrame
    predictions: dict[int, dict[tuple[str, str], np.ndarray]]


def run(baseline_model: Predictor, lineages: Lineages, cases: Cases, cfg: Config, work: Work = uncached) -> TableA:
    """Table A: the baseline on the test cases (once, a unit of ``work``) and each seed's rows from its lineage."""
    baseline = work("baseline", partial(CaseEvaluator({"LiteMedSAM": baseline_model}).evaluate, cases.test,
                                        "LiteMedSAM"))
    frames = [baseline.assign(row="LiteMedSAM", seed=cfg.seeds[0])]
    frames += [lineage.per_case for lineage in lineages.by_seed.values()]
    return TableA(pd.concat(frames, ignore_index=True),
                  {seed: lineage.predictions for seed, lineage in lineages.by_seed.items()})


def record_table_a(table: TableA, lineages: Lineages, cases: Cases) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per row and seed, DSC and NSD per modality and their average (:func:`~.evaluation.summary_metrics`), as
    records, and the per-case lines they are weighted means of (:func:`~.evaluation.case_lines`, with ``row`` and
    ``seed``). A metric without any score (every case nan) has no record for that seed."""
    config = {**lineages.config, "test_cases": len(cases.test)}
    lines, samples = [], []
    for (row, seed), frame in table.per_case.groupby(["row", "seed"], sort=False):
        lines += [{"row": row, "seed": seed, "metric": metric, "value": value}
                  for metric, value in summary_metrics(modality_summary(frame)).items() if not np.isnan(value)]
        samples.append(case_lines(frame).assign(row=row, seed=seed))
    order = {row: i for i, row in enumerate(ROWS)}
    records = pd.DataFrame(lines).sort_values(["row", "seed"], kind="stable",
                                              key=lambda c: c.map(order) if c.name == "row" else c)
    return records.assign(config=[config] * len(lines), unit="%"), pd.concat(samples, ignore_index=True)


def wide_table_a(table: TableA) -> pd.DataFrame:
    """Mean over seeds of each row's DSC and NSD per modality and on average (rows in Table A's order)."""
    summary = table.per_case.groupby(["row", "seed"]).apply(modality_summary, include_groups=False)
    return summary.groupby(level=[0, 2])[["dsc", "nsd"]].mean().unstack(level=1).reindex(ROWS)


def deploy(lineages: Lineages, routers: Routers, cases: Cases, cfg: Config, folder: Path
           ) -> tuple[list[dict], dict[str, Any], pd.DataFrame]:
    """Export what the timed test cases need (the experts they are routed to and the general fall-back) of the
    first seed's lineage to ``folder`` (ONNX and OpenVINO IR, parity-checked). Returns the timed cases
    (``timing_per_modality`` per modality of ``timing_modalities``), the deployment manifest and its parity
    checks, one line per (expert, part, backend)."""
    timed = timed_cases(cases, cfg)
    lineage = lineages.models[cfg.seeds[0]]
    all_experts = {GENERAL: lineage["+ general FT"], **lineage["experts"]}
    needed = {GENERAL, *(routers.file_name.route(c["name"]) for c in timed)}
    deployed = {name: model.cpu() for name, model in all_experts.items() if name in needed}
    from mdbench.papers.daft.deploy.export import save_deployment

    manifest = save_deployment(folder, deployed, example_image=cases.test[0]["imgs"])
    parity = pd.DataFrame([{"expert": name, "part": part, "backend": backend, "max |diff|": r["max_abs_diff"],
                            "sign agreement": r["agreement"], "passed": r["passed"]}
                           for name, parts in manifest["parity"].items() for part, by in parts.items()
                           for backend, r in by.items()])
    return timed, manifest, parity


@dataclass
class Timings:
    """Seconds per timed case and Table B stage (``frame``: case, stage, seconds, dims, output, ...), the mean per
    stage in Table B's order, and the threads each process had."""

    frame: pd.DataFrame
    per_stage: pd.Series
    threads: int | None  # None only where os.cpu_count() cannot tell the core count


def time_cases(timed: Sequence[dict], cases: Cases, cfg: Config, work: Path) -> Timings | None:
    """Table B: each timed case in a fresh process per stage (:func:`mdbench.papers.daft.deploy.timing.time_cases`),
    with the deployment in ``work/deploy``; None when no case is timed. A failed process raises."""
    if not timed:
        return None
    threads = cfg.timing_threads or os.cpu_count()
    names = {c["name"] for c in timed}
    paths = [p for p in cases.paths["test"] if p.name in names]
    frame = pd.concat([timing.time_cases(paths, stage, work / "deploy", work / "timing", threads=threads)
                       for stage in timing.table_b_stages()], ignore_index=True)
    frame["dims"] = frame.case.str[0].astype(int)
    failed = frame[frame.returncode != 0]
    if not failed.empty:
        raise RuntimeError(f"timed cases failed: {failed.error.tolist()}")
    return Timings(frame, frame.groupby("stage", sort=False).seconds.mean(), threads)


def record_table_b(timings: Timings, table: TableA, routers: Routers, timed: Sequence[dict], cfg: Config,
                   cpu: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table B's records (seconds per case overall and per 2D / 3D, speedup over the baseline, per stage; the
    agreement (%) of the last stage's deployed masks with Table A's in-process masks of the same expert) and the
    per-case lines they are means of (unit: the case name; the speedup, a ratio of means, has none)."""
    in_process = table.predictions[cfg.seeds[0]]
    last = timing.table_b_stages()[-1]
    outputs = timings.frame[timings.frame.stage == last.name].set_index("case").output
    agreement = [{"row": last.name, "unit": c["name"], "metric": "mask_agreement",
                  "value": 100 * float((np.load(outputs[c["name"]])["segs"]
                                        == in_process[(routers.file_name.route(c["name"]), c["name"])]).mean())}
                 for c in timed]
    per_case = [{"row": r.stage, "unit": r.case, "metric": metric, "value": r.seconds}
                for r in timings.frame.itertuples() for metric in ("seconds_per_case", f"seconds_{r.dims}d")]
    samples = pd.DataFrame(per_case + agreement).assign(seed=0)
    base = timings.per_stage.iloc[0]
    lines = []
    for stage, seconds in timings.per_stage.items():
        values = {"seconds_per_case": seconds, "speedup": base / seconds}
        by_dims = timings.frame[timings.frame.stage == stage].groupby("dims").seconds.mean()
        values.update({f"seconds_{d}d": s for d, s in by_dims.items()})
        lines += [{"row": stage, "metric": metric, "value": value, "unit": "x" if metric == "speedup" else "s"}
                  for metric, value in values.items()]
    lines.append({"row": last.name, "metric": "mask_agreement", "unit": "%",
                  "value": float(np.mean([line["value"] for line in agreement]))})
    config = {"threads": timings.threads, "cases": [c["name"] for c in timed], "cpu": cpu}
    return pd.DataFrame(lines).assign(config=[config] * len(lines)), samples


# ---------------------------------------------------------------------------------------------------- figures
def record_figures(store) -> dict:
    """The figures that ``store``'s records and per-case outputs alone make (``mdbench figures``, no retraining):
    ``dsc_and_seconds`` (:func:`plot_scores` on Table A's DSC per case and Table B's seconds per case); none
    without Table A."""
    records = store.records()
    scored, timed, threads = [], [], None
    for rec in records:
        lines = store.samples(rec) if rec.table in ("table_a", "table_b") else None
        if lines is None or rec.metric not in ("dsc_average", "seconds_per_case"):
            continue  # one record per row reads the row's per-case file
        if rec.table == "table_a":
            dsc = lines[lines.metric.str.match(r"dsc_(?!average)")]
            scored.append(pd.DataFrame({"row": rec.row, "modality": dsc.metric.str.removeprefix("dsc_"),
                                        "dsc": dsc.value, "error": "", "seed": dsc.seed, "case": dsc.unit}))
        else:
            per_case = lines[lines.metric == "seconds_per_case"]
            timed.append(pd.DataFrame({"case": per_case.unit, "stage": rec.row, "seconds": per_case.value,
                                       "dims": per_case.unit.str[0].astype(int)}))
            threads = rec.config.get("threads")
    if not scored:
        return {}
    timings = None
    if timed:
        order = [stage.name for stage in timing.table_b_stages()]
        frame = pd.concat(timed, ignore_index=True).sort_values("stage", key=lambda s: s.map(order.index), kind="stable")
        timings = Timings(frame, frame.groupby("stage", sort=False).seconds.mean(), threads)
    return {"dsc_and_seconds": plot_scores(TableA(pd.concat(scored, ignore_index=True), {}), timings)}


@figures.styled
def plot_scores(table: TableA, timings: Timings | None):
    """DSC per case by modality and row (rows by human name); beside it, seconds per case of each Table B stage:
    bars the mean over timed cases, annotated with the speed-up ×N over the first stage, points the 2D and 3D
    cases' means (log scale only over a decade or more). Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    names = figures.method_names("daft")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    scored = table.per_case[table.per_case.error == ""].assign(method=lambda f: f.row.map(lambda r: figures.human(names, r)))
    sns.stripplot(data=scored, x="modality", y="dsc", hue="method", hue_order=[figures.human(names, r) for r in ROWS],
                  dodge=True, ax=axes[0], size=5)
    axes[0].set_title("DSC per case by modality")
    axes[0].set_ylabel("DSC (%)")
    axes[0].legend(fontsize=6, title="method")
    if timings is not None:
        stages = list(timings.per_stage.index)
        bars = axes[1].bar(stages, timings.per_stage.to_numpy(), color="0.8", label="all timed cases")
        figures.annotate_speedups(axes[1], bars, list(timings.per_stage.iloc[0] / timings.per_stage))
        by_dims = timings.frame.groupby(["stage", "dims"], sort=False).seconds.mean().reset_index()
        sns.pointplot(data=by_dims.assign(cases=by_dims.dims.map("{}D".format)), x="stage", y="seconds", hue="cases",
                      order=stages, linestyles="none", markers="D", ax=axes[1])
        figures.set_scale(axes[1], "y", timings.frame.seconds)
        axes[1].set_ylabel("seconds per case")
        axes[1].set_xlabel("")
        axes[1].set_title(f"seconds per case, fresh process each ({timings.threads} threads); ×N: speed-up")
        axes[1].tick_params(axis="x", labelrotation=25, labelsize=7)
        axes[1].legend(fontsize=7)
    else:
        axes[1].set_axis_off()
        axes[1].text(0.5, 0.5, "Table B not timed in this profile", ha="center", va="center")
    fig.tight_layout()
    return fig


@figures.styled
def plot_curves(curves: pd.DataFrame):
    """The training budgets: each stage's loss per epoch (:meth:`Lineages.curves_frame`), one panel per stage (KD's
    embedding MSE, general FT's and each DAFT expert's Dice + BCE + IoU loss), one colour per seed, training loss
    solid, held-out loss dashed, a dot at the epoch each training kept. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stages = list(dict.fromkeys(curves.stage))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        frame = curves[curves.stage == stage]
        for seed, run in frame.groupby("seed"):
            line, = ax.plot(run.epoch, run.train_loss, lw=1, label=f"seed {seed}")
            watched = "val_loss" in run and run.val_loss.notna().any()
            if watched:
                ax.plot(run.epoch, run.val_loss, lw=1, ls="--", color=line.get_color())
            kept = run[run.kept]
            ax.plot(kept.epoch, kept.val_loss if watched else kept.train_loss, "o", ms=4, color=line.get_color())
        losses = frame.filter(["train_loss", "val_loss"]).stack()
        figures.set_scale(ax, "y", losses[losses > 0])
        ax.set_title(stage + (": embedding MSE" if stage == "KD" else ": Dice + BCE + IoU"), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("loss (solid: training, dashed: held out)")
    axes[0, -1].legend(fontsize=7, title="dot: epoch kept", title_fontsize=7)
    fig.tight_layout()
    return fig


def _overlay(ax, case: dict, labels: np.ndarray, title: str) -> None:
    """A case's image (3D: the middle slice of its first box) with its boxes (yellow), ground truth (green) and
    predicted labels (red)."""
    import matplotlib.pyplot as plt

    dims = case["dims"]
    z = int(case["boxes"][0][2] + (case["boxes"][0][5] - case["boxes"][0][2]) // 2) if dims == 3 else None
    image = case["imgs"] if z is None else case["imgs"][z]
    gts, pred = (case["gts"], labels) if z is None else (case["gts"][z], labels[z])
    ax.imshow(image, cmap="gray")
    ax.contour(gts > 0, levels=[0.5], colors="lime", linewidths=1)
    if pred.any():
        ax.contour(pred > 0, levels=[0.5], colors="red", linewidths=1)
    for box in case["boxes"]:
        x0, y0, x1, y1 = (box[0], box[1], box[2], box[3]) if dims == 2 else (box[0], box[1], box[3], box[4])
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=0.8))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


@figures.styled
def plot_overlays(table: TableA, routers: Routers, cases: Cases, seed: int):
    """One test case per modality as DAFT with the file-name router segmented it (seed ``seed``), titled with the
    expert it went to and its DSC. Returns the figure."""
    import matplotlib.pyplot as plt

    shown = {c["modality"]: c for c in shown_cases(cases)}
    in_process = table.predictions[seed]
    scores = table.per_case[(table.per_case.seed == seed) & (table.per_case.row == "+ DAFT (file-name router)")]
    dsc = dict(zip(scores.case, scores.dsc, strict=True))
    fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3), squeeze=False)
    for ax, (modality, case) in zip(axes[0], shown.items(), strict=True):
        expert = routers.file_name.route(case["name"])
        _overlay(ax, case, in_process[(expert, case["name"])], f"{modality} -> {expert}: DSC {dsc[case['name']]:.0f}")
    figures.mask_legend(axes[0, -1], {"box prompt": "yellow", "ground truth": "lime", "prediction": "red"})
    fig.suptitle("DAFT (file-name router): one test case per modality", fontsize=9)
    fig.tight_layout()
    return fig

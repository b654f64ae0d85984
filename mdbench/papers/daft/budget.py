"""What a DAFT run costs on one GPU before it runs: each stage's FLOPs or calls, counted from the cases and the
config, turned into minutes at stated rates.

The FLOPs of one 256x256 input are counted by :func:`mdbench.efficiency.count_flops` (:func:`forward_gflops`: the
student's image encoder, its mask decoder for one box, the teacher's encoder). A training step costs 3x its forward
pass (forward, and backward to the activations and to the weights; Kaplan et al. 2020), an evaluation or
embedding pass 1x. :func:`estimate` multiplies them out over the run (:func:`sizes`: KD inputs, fine-tuning items,
each expert's items, the test cases' encoder and decoder calls) as upper bounds: every training runs its largest
number of epochs (``kd_epochs``, ``ft_epochs``, ``daft_epochs``); early stopping can only shorten them.

The rates (:class:`Rates`) are assumptions with their sources; the next gpu run measures them (the notebook prints
the GPU utilisation and each training's seconds per epoch in its curves).

- ``fp32_tflops`` 17.8: the training stages of the gpu block before this one (fp32 eager, PromptSamples through 8
  DataLoader workers; KD 20 epochs of 900 inputs, general FT 15 epochs of 630 cases, DAFT 6 epochs of 1300 items,
  2 seeds: 8.5 PFLOP by this count with every epoch run) took 8 min on an H200 (paper.yaml's note of that run;
  had early stopping cut fine-tuning short, the rate was lower). Used for the fp32 passes (teacher embeddings,
  embedding MSE, BatchNorm recalibration) and for training without ``amp``.
- ``bf16_speedup`` 1.6: training under bf16 autocast with channels-last and the data on the device, over that fp32
  rate. bf16 halves the bytes of the memory-bound layers (BatchNorm, activations, depthwise convolutions) and
  doubles the tensor cores' peak over TF32 for the dense ones (the neck's fused MBConv, 22 of the encoder's 34
  GFLOPs); taken below 2x. LiteMedSAM's encoder reached 32.5 TFLOP/s forward in bf16, eager, batch 16 on an H100
  (``results/efcm/benchmarks``), an upper reference for this encoder's training.
- ``compile_speedup`` 1.5 and ``compile_s`` 60 per compiled graph (4: KD's and fine-tuning's, each training and
  evaluation; the cache serves later seeds and experts): the same benchmark ran LiteMedSAM's encoder 1.8x faster
  compiled (791 vs 434 inputs/s at batch 16); taken lower for an encoder whose training graph is also compiled.
- ``encoder_call_ms`` 14 and ``decoder_call_ms`` 5: Table A's inference runs one image at a time (a volume's
  slices in batches of up to 32), bound by kernel launches: LiteMedSAM's encoder at batch 1 ran 72.7 inputs/s eager
  on the H100 (13.8 ms); the mask decoder (two transformer layers, 3.6 GFLOPs) assumed at about a third of that.
  Table A's seeds ran slower than this says on an H200 (2026-12-03: about 2 min of each seed's 7.7 at 5 % GPU
  utilisation, scoring included, which threads now do meanwhile).
- ``convert_case_ms`` 31 and ``bank_frame_ms`` 3: host work, measured on the 2-core development CPU (1830 real cases
  converted to challenge files in 57 s; a prompt bank's frames preprocessed at about 3 ms each), an upper bound
  for the GPU machine's faster cores.
- ``overhead_s`` 90: imports and notebook start, model costs, the learned router's fit on the training images,
  exporting and parity-checking the general model (Table B is not timed at gpu).

GPU utilisation (:func:`utilisation`): a compute-bound stage keeps the GPU busy ``busy`` of its time, a
launch-bound one ``launch_bound_busy``, host work not at all.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mdbench.efficiency import count_flops
from mdbench.models.litemedsam import EMBED_BATCH, LiteMedSAM
from mdbench.papers.daft.experiment import Cases, Config
from mdbench.papers.daft.routing import GENERAL, FileNameRouter

__all__ = ["ASSUMED", "Rates", "estimate", "forward_gflops", "of_run", "sizes", "summary", "utilisation"]

CALIBRATION_IMAGES = 256  # BatchNorm recalibration before each validation (training.finetune's default)


@dataclass(frozen=True)
class Rates:
    """How fast each kind of stage runs on one H200 (the module docstring gives each number's source)."""

    fp32_tflops: float = 17.8
    bf16_speedup: float = 1.6
    compile_speedup: float = 1.5
    compile_s: float = 60.0
    compiled_graphs: int = 4
    encoder_call_ms: float = 14.0
    decoder_call_ms: float = 5.0
    convert_case_ms: float = 31.0
    bank_frame_ms: float = 3.0
    overhead_s: float = 90.0
    busy: float = 0.95
    launch_bound_busy: float = 0.3


ASSUMED = Rates()


def forward_gflops(teacher: LiteMedSAM, student: LiteMedSAM) -> dict[str, float]:
    """GFLOPs of one 256x256 input: the student's image ``encoder``, its prompt encoder and mask ``decoder`` for
    one box, and the ``teacher``'s image encoder (:func:`mdbench.efficiency.count_flops`)."""
    image, box = torch.rand(1, 3, 256, 256), torch.tensor([[16.0, 16.0, 128.0, 128.0]])
    with torch.no_grad():  # detached: views of parameters made without grad would confuse the module tracker
        sparse, dense = student.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        prompts = (torch.rand(1, 256, 64, 64), student.prompt_encoder.get_dense_pe().detach(), sparse.detach(),
                   dense.detach(), False)
    return {"encoder": count_flops(student.image_encoder, image).flops / 1e9,
            # the mask decoder's last argument, multimask_output, is a bool
            "decoder": count_flops(student.mask_decoder, prompts).flops / 1e9,  # type: ignore[arg-type]
            "teacher": count_flops(teacher.image_encoder, image).flops / 1e9}


def _calls(cases: list[dict]) -> tuple[int, int]:
    """(encoder calls, decoder calls) that segmenting ``cases`` takes (:func:`~.inference.segment_case`, each slice
    embedded once, in batches): a 2D case one of each; a volume one encoder call per :data:`EMBED_BATCH` slices the
    boxes span and one decoder call per box and slice."""
    encoder = decoder = 0
    for case in cases:
        if case["dims"] == 2:
            encoder, decoder = encoder + 1, decoder + 1
            continue
        spans = [range(int(box[2]), int(box[5]) + 1) for box in np.asarray(case["boxes"])]
        encoder += math.ceil(len(set().union(*spans)) / EMBED_BATCH)
        decoder += sum(len(span) for span in spans)
    return encoder, decoder


def _present(case: dict) -> int:
    """Slices of a volume with an object (1 or 0 for a 2D image), at the case's own size: the counts of
    :func:`~.training.encoder_inputs` and :class:`~.training.PromptSamples` up to an object too small to survive
    the resizing to 256 px (none here: volumes are enlarged)."""
    gts = np.asarray(case["gts"])
    return int(gts.any()) if case["dims"] == 2 else int(gts.reshape(len(gts), -1).any(axis=1).sum())


def _kd_inputs(cases: list[dict], per_volume: int) -> int:
    """KD inputs of ``cases`` (:func:`~.training.encoder_inputs`): every 2D image, and per volume its slices with an
    object, at most ``per_volume``."""
    return sum(1 if case["dims"] == 2 else min(per_volume, _present(case)) for case in cases)


def _items(cases: list[dict], per_volume: int | None) -> int:
    """Training items of ``cases``: one per 2D case with an object; per volume one (``per_volume`` None: a random
    slice each time) or its slices with an object, at most ``per_volume``."""
    return sum(min(_present(case), 1 if per_volume is None or case["dims"] == 2 else per_volume) for case in cases)


def sizes(cases: Mapping[str, list[dict]], experts: list[str], kd_slices_per_volume: int, kd_images: int | None,
          daft_slices_per_volume: int | None) -> dict[str, int]:
    """What the run trains and scores, counted from its ``cases`` (split -> cases, as :func:`~.experiment.load_data`
    reads them): KD inputs (``kd_train``, ``kd_val``; ``kd_test``: the test images and slices its embedding MSE is
    measured on), fine-tuning items (``ft_train``, ``ft_val``), DAFT's items
    over all experts (``daft_train``, ``daft_val``; volumes expanded into their slices, at most
    ``daft_slices_per_volume`` each), the experts trained (``experts``), the images and slices general FT's prompt
    banks hold (``bank_frames``: every slice with an object, as a random one is drawn), and the test cases' encoder
    and decoder calls
    for one model (``test_encoder``, ``test_decoder``) and for the experts' share (``expert_encoder``,
    ``expert_decoder``)."""
    router = FileNameRouter(experts)
    routed = {split: [c for c in cs if router.route(c["name"]) != GENERAL] for split, cs in cases.items()}
    kd_train = _kd_inputs(cases["train"], kd_slices_per_volume)
    test, expert = _calls(cases["test"]), _calls(routed["test"])
    trained = {router.route(c["name"]) for c in routed["train"]}
    return {"kd_train": kd_train if kd_images is None else min(kd_images, kd_train),
            "kd_val": _kd_inputs(cases["val"], kd_slices_per_volume),
            "kd_test": _kd_inputs(cases["test"], kd_slices_per_volume),
            "ft_train": _items(cases["train"], None), "ft_val": _items(cases["val"], None),
            "daft_train": _items(routed["train"], daft_slices_per_volume or 10**9),
            "daft_val": _items(routed["val"], daft_slices_per_volume or 10**9), "experts": len(trained),
            "bank_frames": sum(_present(c) for c in cases["train"] + cases["val"]),
            "test_encoder": test[0], "test_decoder": test[1], "expert_encoder": expert[0], "expert_decoder": expert[1]}


def estimate(cfg: Config, counts: Mapping[str, int], gflops: Mapping[str, float], cases_converted: int = 0,
             rates: Rates = ASSUMED) -> pd.DataFrame:
    """The run's cost per stage, one line each: ``runs`` (how often it runs), ``tflop`` (GPU work), ``seconds`` at
    ``rates`` and whether it is ``compute``-bound, ``launch``-bound or ``host`` work.

    Args:
        cfg: the run's :class:`~mdbench.papers.daft.experiment.Config` (seeds, epochs, ``kd_patience``, speed).
        counts: :func:`sizes` of its cases.
        gflops: :func:`forward_gflops` of its models.
        cases_converted: cases written from the real datasets first (0 when they are there already).
    """
    seeds = len(cfg.seeds)
    fp32 = rates.fp32_tflops * 1e3  # GFLOP/s
    train = fp32 * (rates.bf16_speedup if cfg.amp else 1.0) * (rates.compile_speedup if cfg.compile else 1.0)
    enc, seg = gflops["encoder"], gflops["encoder"] + gflops["decoder"]
    watched = cfg.kd_patience is not None
    lines: list[dict] = []

    def gpu(stage: str, runs: int, training_gflop: float, pass_gflop: float) -> None:
        """A stage of ``training_gflop`` at the training rate and ``pass_gflop`` of fp32 passes."""
        lines.append({"stage": stage, "runs": runs, "tflop": (training_gflop + pass_gflop) / 1e3,
                      "seconds": training_gflop / train + pass_gflop / fp32, "bound": "compute"})

    def other(stage: str, runs: int, seconds: float, bound: str) -> None:
        lines.append({"stage": stage, "runs": runs, "tflop": 0.0, "seconds": seconds, "bound": bound})

    other("overheads: start, model costs, router, export", 1, rates.overhead_s, "host")
    if cases_converted:
        other("real datasets -> challenge cases", cases_converted, cases_converted * rates.convert_case_ms / 1e3,
              "host")
    kd_inputs = counts["kd_train"] + counts["kd_test"] + (counts["kd_val"] if watched else 0)
    gpu("teacher embeddings of the KD and test inputs", kd_inputs, 0.0, kd_inputs * gflops["teacher"])
    per_epoch = 3 * counts["kd_train"] * enc + ((counts["kd_val"] + CALIBRATION_IMAGES) * enc if watched else 0)
    gpu(f"KD, up to {cfg.kd_epochs} epochs (x {seeds} seeds)", seeds, seeds * cfg.kd_epochs * per_epoch,
        seeds * (2 * counts["kd_test"] + counts["kd_train"]) * enc)  # MSE before and after, BatchNorm recalibration
    ft_epoch = 3 * counts["ft_train"] * seg + counts["ft_val"] * seg + CALIBRATION_IMAGES * enc
    gpu(f"general FT, up to {cfg.ft_epochs} epochs (x {seeds})", seeds, seeds * cfg.ft_epochs * ft_epoch, 0.0)
    daft_epoch = 3 * counts["daft_train"] * seg + counts["daft_val"] * seg + counts["experts"] * CALIBRATION_IMAGES * enc
    gpu(f"DAFT, {counts['experts']} experts, up to {cfg.daft_epochs} epochs (x {seeds})", seeds,
        seeds * cfg.daft_epochs * daft_epoch, 0.0)
    if cfg.on_device:
        frames = counts["bank_frames"] + counts["daft_train"] + counts["daft_val"]  # general FT's, the experts'
        other("prompt banks (preprocessing on the host)", seeds, seeds * frames * rates.bank_frame_ms / 1e3, "host")
    if cfg.compile:
        other("torch.compile", rates.compiled_graphs, rates.compiled_graphs * rates.compile_s, "host")
    calls = lambda encoder, decoder: (encoder * rates.encoder_call_ms + decoder * rates.decoder_call_ms) / 1e3  # noqa: E731
    other("Table A: LiteMedSAM on the test cases", 1, calls(counts["test_encoder"], counts["test_decoder"]), "launch")
    other(f"Table A: KD only, general FT, experts (x {seeds})", seeds,
          seeds * calls(2 * counts["test_encoder"] + counts["expert_encoder"],
                        2 * counts["test_decoder"] + counts["expert_decoder"]), "launch")
    return pd.DataFrame(lines)


def of_run(cfg: Config, cases: Cases, teacher: LiteMedSAM, student: LiteMedSAM, rates: Rates = ASSUMED
           ) -> pd.DataFrame:
    """:func:`estimate` of a notebook run: its cases' :func:`sizes`, its models' :func:`forward_gflops`, and the
    conversion of its cases from the real datasets (counted even when an earlier run left them on disk)."""
    counts = sizes(cases.cases, list(cfg.experts), cfg.kd_slices_per_volume, cfg.kd_images, cfg.daft_slices_per_volume)
    converted = sum(map(len, cases.cases.values())) if cfg.dataset == "real" and cfg.cases_dir is None else 0
    return estimate(cfg, counts, forward_gflops(teacher, student), converted, rates)


def summary(frame: pd.DataFrame) -> str:
    """One line: the minutes in all, of which on the GPU computing, on the GPU launch-bound, and host work."""
    by = frame.groupby("bound").seconds.sum() / 60
    return (f"about {math.ceil(frame.seconds.sum() / 60)} min in all ({frame.tflop.sum() / 1e3:.1f} PFLOP): "
            f"{by.get('compute', 0.0):.1f} min computing, {by.get('launch', 0.0):.1f} min launch-bound, "
            f"{by.get('host', 0.0):.1f} min host work; GPU utilisation about {utilisation(frame):.0f} %")


def utilisation(frame: pd.DataFrame, rates: Rates = ASSUMED) -> float:
    """The GPU utilisation (%) an :func:`estimate` implies, weighting each stage by its seconds."""
    busy = frame["bound"].map({"compute": rates.busy, "launch": rates.launch_bound_busy, "host": 0.0})
    return float(100 * (frame["seconds"] * busy).sum() / frame["seconds"].sum())

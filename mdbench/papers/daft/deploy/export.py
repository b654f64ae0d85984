"""Export box-prompted SAM models to OpenVINO IR with parity checks, and write a deployment folder.

DAFT's path: PyTorch -> ONNX (checked with ``allclose`` at atol 1e-3) -> OpenVINO IR (``ov.convert_model`` +
``ov.save_model``; here ``Core.read_model`` + ``ov.save_model``). Here both halves of a model go to ONNX (:func:`mdbench.efficiency.export_onnx`) and then to IR;
the saved IR (what the runtime loads) and the ONNX file under ONNX Runtime are both compared with PyTorch on a
real preprocessed image (:func:`mdbench.efficiency.check_parity`), with tolerances relative to each output's scale,
and so are the masks that deployment delivers (:class:`MaskParityReport`). ``export_with_parity`` is not used because
it checks a model converted in memory, not the saved IR, and would convert every model twice.

- ``encoder``: (1, 3, 256, 256) -> (1, 256, 64, 64);
- ``decoder``: prompt encoder + mask decoder, embedding (1, 256, 64, 64) + one box (1, 4) -> logits (1, 1, 256, 256)
  and IoU (1, 1). One box per call keeps the embedding un-copied; the runtime loops over boxes.

Weights are saved in FP32 (``compress_to_fp16=False``; ``ov.save_model`` would halve them to FP16 by default,
which DAFT accepted but which the parity check here would have to loosen for).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdbench.data import boxprompt
from mdbench.efficiency import (
    BACKENDS,
    OnnxRuntimeModel,
    ParityError,
    ParityReport,
    check_parity,
    compare_outputs,
    export_onnx,
)
from mdbench.models.litemedsam import LiteMedSAM, preprocess_image
from mdbench.papers.daft.deploy.runtime import MANIFEST

__all__ = ["MaskParityReport", "SamDecoder", "export_openvino", "save_deployment"]


class SamDecoder(nn.Module):
    """Prompt encoder + mask decoder of a :class:`LiteMedSAM` as one module: (embedding, boxes) -> (logits, iou)."""

    def __init__(self, model: LiteMedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 256, 64, 64), (B, 4) -> (B, 1, 256, 256) low-res logits, (B, 1) IoU."""
        return self.model.decode(embedding, boxes)


class _CompiledCall:
    """A compiled OpenVINO model as a callable on numpy arrays / tensors returning its outputs as a tuple."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def __call__(self, *inputs) -> tuple[np.ndarray, ...]:
        arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in inputs]
        result = self.compiled(arrays)
        return tuple(np.asarray(result[output]) for output in self.compiled.outputs)


@dataclass(frozen=True)
class MaskParityReport(ParityReport):
    """Parity of the masks deployment delivers: (K, H, W) mask logits at the image's resolution (mask = logit > 0).

    ``max_abs_diff`` / ``max_rel_diff``: the logits' differences; ``agreement``: fraction of mask pixels that agree;
    ``dice``: the smallest Dice of a deployed mask against PyTorch's (1 where both are empty). ``passed`` also needs
    ``dice >= min_dice``.
    """

    dice: float
    min_dice: float

    def describe(self) -> str:
        return f"{super().describe()}, dice={self.dice:.4f} (min {self.min_dice:g})"


def _first_output(fn: Callable) -> Callable[..., np.ndarray]:
    """``fn`` (a torch module or an exported model; both take tensors) as numpy arrays in -> its first output."""

    def call(*arrays: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = fn(*(torch.tensor(a) for a in arrays))
        first = out[0] if isinstance(out, (tuple, list)) else out
        return first.numpy() if isinstance(first, torch.Tensor) else np.asarray(first)

    return call


def _mask_logits(encoder: Callable, decoder: Callable, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) image and (K, 4) xyxy boxes in its pixels -> (K, H, W) mask logits, computed the way the runtime
    computes its masks (:class:`mdbench.papers.daft.deploy.runtime.OpenVinoSAM`: numpy pre- and post-processing, one decoder call
    per box), with ``encoder``/``decoder`` either PyTorch's halves or their exports."""
    encode, decode = _first_output(encoder), _first_output(decoder)
    hw = image.shape[:2]
    embedding = encode(boxprompt.preprocess_image(image))
    low_res = np.concatenate([decode(embedding, box[None]) for box in boxprompt.scale_boxes(boxes, hw)])
    return boxprompt.postprocess_logits(low_res, hw)


def _check_masks(reference: np.ndarray, deployed: np.ndarray, input_shapes: list[tuple[int, ...]],
                 min_dice: float, **tolerances) -> MaskParityReport:
    """Compare (K, H, W) mask logits: :func:`mdbench.efficiency.compare_outputs` at threshold 0, plus the masks' Dice."""
    from mdbench.metrics import dice_per_class  # MONAI takes seconds to import: only exports pay for it

    report = compare_outputs(reference, deployed, threshold=0.0, input_shapes=input_shapes, **tolerances)
    per_mask = dice_per_class((deployed > 0).astype(np.uint8), (reference > 0).astype(np.uint8), num_classes=2)
    dice = float(np.nan_to_num(per_mask.numpy(), nan=1.0).min())  # nan: both masks empty, which agree
    fields = {**report.as_dict(), "passed": report.passed and dice >= min_dice}
    return MaskParityReport(**fields, dice=dice, min_dice=min_dice)


def export_openvino(model: LiteMedSAM, folder: str | Path, example_image: np.ndarray | None = None,
                    box: tuple[float, float, float, float] = (64.0, 64.0, 192.0, 192.0), atol: float = 1e-5,
                    rtol: float = 1e-3, min_agreement: float = 0.999, min_dice: float = 0.99,
                    threads: int | None = None) -> dict[str, dict[str, ParityReport]]:
    """Export ``model`` to ``folder/encoder.xml`` and ``folder/decoder.xml`` (FP32 OpenVINO IR), checking parity.

    The saved IR itself (what the runtime loads) is compiled and compared with PyTorch; so is the intermediate ONNX
    file under ONNX Runtime. Each half is compared on its own inputs (the decoder on PyTorch's embedding), then the
    masks: the example image and box through each backend's encoder and decoder, pre- and post-processed as the
    runtime does, against the same pipeline with PyTorch's halves. The model is moved to the CPU.

    Args:
        example_image: an (H, W[, 3]) image for the parity inputs (default: a smooth synthetic one).
        box: the parity box in the 256 frame (for the masks, the same box in the image's pixels).
        atol, rtol: each output (embedding, low-res logits, IoU, the masks' logits) may differ from PyTorch's by at
            most ``atol + rtol * max|torch output|``.
        min_agreement: the fraction of elements whose sign (> 0) must agree: embedding values, mask logits, and the
            masks' pixels.
        min_dice: the smallest Dice allowed between a deployed mask and PyTorch's.
        threads: inference threads of both backends (None: OpenVINO's default, all cores; ONNX Runtime's
            :class:`mdbench.efficiency.OnnxRuntimeModel` default, torch's thread count).

    Returns:
        ``{"encoder" | "decoder" | "masks": {"openvino": ParityReport, "onnxruntime": ParityReport}}``; the masks'
        reports are :class:`MaskParityReport`.

    Raises:
        mdbench.efficiency.ParityError: an export disagrees with PyTorch beyond the tolerances.
    """
    import openvino as ov

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if example_image is None:
        yy, xx = np.mgrid[0:256, 0:256]
        example_image = (127 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint8)
    model = model.cpu().eval()
    x = preprocess_image(example_image)
    with torch.no_grad():
        embedding = model.image_encoder(x)
    boxes = torch.tensor([box], dtype=torch.float32)
    # eval() on the wrapper too: the parity check restores each module's training flag afterwards, and a fresh
    # wrapper's flag (True) would switch the wrapped model's BatchNorm layers to batch statistics
    parts = {"encoder": (model.image_encoder, (x,)), "decoder": (SamDecoder(model).eval(), (embedding, boxes))}
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    tolerances = dict(atol=atol, rtol=rtol, min_agreement=min_agreement)
    reports: dict[str, dict[str, ParityReport]] = {}
    runtimes: dict[str, dict[str, Callable[..., Any]]] = {}  # part -> backend -> its compiled part
    with tempfile.TemporaryDirectory() as workdir:
        for name, (module, inputs) in parts.items():
            with warnings.catch_warnings():
                # expected: the traced shape checks become constants, and the exporter's constant-folding notes
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
                onnx_path = export_onnx(module, inputs, Path(workdir) / f"{name}.onnx", dynamic_batch=False)
            xml = folder / f"{name}.xml"
            # read_model (the ONNX frontend alone) gives the same graph as ov.convert_model here, ten times faster
            ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
            runtimes[name] = {"openvino": _CompiledCall(ov.Core().compile_model(str(xml), "CPU", config)),
                              "onnxruntime": OnnxRuntimeModel(onnx_path, num_threads=threads)}
            reports[name] = {backend: check_parity(module, runtime, inputs, atol=atol, rtol=rtol,
                                                    min_agreement=min_agreement, threshold=0.0)
                             for backend, runtime in runtimes[name].items()}
        image_boxes = np.asarray([box]) * max(example_image.shape[:2]) / boxprompt.IMAGE_SIZE
        reference = _mask_logits(parts["encoder"][0], parts["decoder"][0], example_image, image_boxes)
        reports["masks"] = {
            backend: _check_masks(reference, _mask_logits(runtimes["encoder"][backend], runtimes["decoder"][backend],
                                                          example_image, image_boxes),
                                  [example_image.shape, image_boxes.shape], min_dice, **tolerances)
            for backend in BACKENDS}
    failures = [f"{backend} export of the {name}: {report.describe()}"
                for name, by_backend in reports.items() for backend, report in by_backend.items() if not report.passed]
    if failures:
        raise ParityError(f"exports fail parity with PyTorch: {'; '.join(failures)}")
    return reports


def save_deployment(folder: str | Path, experts: Mapping[str, LiteMedSAM], default: str = "general",
                    example_image: np.ndarray | None = None, threads: int | None = None,
                    **export_kwargs) -> dict:
    """Write a deployment folder: ``torch/<expert>.pt`` (state dicts), ``openvino/<expert>/`` (IR), ``manifest.json``.

    Every expert must share the student architecture of the first (its encoder's ``config``), which the manifest
    stores so the PyTorch path can rebuild them. ``export_kwargs`` (tolerances, ``box``) go to :func:`export_openvino`.

    Returns:
        The manifest: ``{"experts", "default", "student",
        "parity": {expert: {"encoder" | "decoder" | "masks": {"openvino" | "onnxruntime": report dict}}}}``.
    """
    folder = Path(folder)
    if default not in experts:
        raise ValueError(f"the default expert {default!r} is not among the experts {sorted(experts)}")
    configs = {name: getattr(model.image_encoder, "config", None) for name, model in experts.items()}
    student = configs[default]
    if student is None or any(config != student for config in configs.values()):
        raise ValueError(f"experts must share one student encoder config (EfficientViTSAMEncoder), got {configs}")
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    parity = {}
    for name, model in experts.items():
        torch.save(model.state_dict(), folder / "torch" / f"{name}.pt")
        reports = export_openvino(model, folder / "openvino" / name, example_image, threads=threads, **export_kwargs)
        parity[name] = {part: {backend: report.as_dict() for backend, report in by_backend.items()}
                        for part, by_backend in reports.items()}
    manifest = {"experts": list(experts), "default": default, "student": student, "parity": parity}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest

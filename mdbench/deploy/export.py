"""Export box-prompted SAM models to OpenVINO IR with parity checks, and write a deployment folder.

DAFT's path: PyTorch -> ONNX (checked with ``allclose`` at atol 1e-3) -> OpenVINO IR (``ov.convert_model`` +
``ov.save_model``; here ``Core.read_model`` + ``ov.save_model``). Here both halves of a model go to ONNX (:func:`mdbench.efficiency.export_onnx`) and then to IR;
the saved IR (what the runtime loads) and the ONNX file under ONNX Runtime are both compared with PyTorch on a
real preprocessed image (:func:`mdbench.efficiency.check_parity`). ``export_with_parity`` is not used because it
checks a model converted in memory, not the saved IR, and would convert every model twice.

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
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from mdbench.efficiency import OnnxRuntimeModel, ParityError, ParityReport, check_parity, export_onnx
from mdbench.models.litemedsam import LiteMedSAM, preprocess_image
from mdbench.deploy.runtime import MANIFEST

__all__ = ["SamDecoder", "export_openvino", "save_deployment"]


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


def export_openvino(model: LiteMedSAM, folder: str | Path, example_image: np.ndarray | None = None,
                    box: tuple[float, float, float, float] = (64.0, 64.0, 192.0, 192.0), atol: float = 1e-3,
                    min_agreement: float = 0.999, threads: int | None = None) -> dict[str, dict[str, ParityReport]]:
    """Export ``model`` to ``folder/encoder.xml`` and ``folder/decoder.xml`` (FP32 OpenVINO IR), checking parity.

    The saved IR itself (what the runtime loads) is compiled and compared with PyTorch; so is the intermediate ONNX
    file under ONNX Runtime. The model is moved to the CPU.

    Args:
        example_image: an (H, W[, 3]) image for the parity inputs (default: a smooth synthetic one).
        box: the parity box in the 256 frame.
        atol, min_agreement: largest absolute difference allowed, and the fraction of elements whose sign (> 0)
            must agree (embedding values and mask logits).

    Returns:
        ``{"encoder" | "decoder": {"openvino": ParityReport, "onnxruntime": ParityReport}}``.

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
    tolerances = dict(atol=atol, min_agreement=min_agreement, threshold=0.0)
    reports = {}
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
            runtimes = {"openvino": _CompiledCall(ov.Core().compile_model(str(xml), "CPU", config)),
                        "onnxruntime": OnnxRuntimeModel(onnx_path, num_threads=threads)}
            reports[name] = {}
            for backend, runtime in runtimes.items():
                report = check_parity(module, runtime, inputs, **tolerances)
                if not report.passed:
                    raise ParityError(f"{backend} export of the {name} fails parity with PyTorch: max_abs_diff="
                                      f"{report.max_abs_diff:.3g} (atol {atol:g}), agreement={report.agreement:.4f}")
                reports[name][backend] = report
    return reports


def save_deployment(folder: str | Path, experts: Mapping[str, LiteMedSAM], default: str = "general",
                    example_image: np.ndarray | None = None, threads: int | None = None,
                    **export_kwargs) -> dict:
    """Write a deployment folder: ``torch/<expert>.pt`` (state dicts), ``openvino/<expert>/`` (IR), ``manifest.json``.

    Every expert must share the student architecture of the first (its encoder's ``config``), which the manifest
    stores so the PyTorch path can rebuild them.

    Returns:
        The manifest: ``{"experts", "default", "student", "parity": {expert: {part: report dict}}}``.
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

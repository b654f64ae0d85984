"""Torch-free OpenVINO runtime of box-prompted SAM experts (DAFT's deployed inference).

A deployment folder (written by :func:`mdbench.papers.daft.deploy.export.save_deployment`) holds, per expert,
``openvino/<expert>/encoder.xml`` ((1, 3, 256, 256) -> (1, 256, 64, 64)) and ``decoder.xml`` (embedding
(1, 256, 64, 64) + box (1, 4) in the 256 frame -> low-res logits (1, 1, 256, 256), IoU (1, 1)), and a
``manifest.json`` listing the experts.

- :class:`OpenVinoSAM`: one expert as a predictor for :func:`mdbench.papers.daft.inference.segment_case`.
- :class:`ExpertPool`: the experts of a folder, compiled lazily (only the one a case needs, DAFT's "lazy loading")
  or all at start; with ``cache_dir`` OpenVINO stores compiled blobs there and later processes load them instead of
  compiling again (``core.set_property({"CACHE_DIR": ...})``, DAFT's compiled-model cache).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mdbench.data.boxprompt import postprocess_logits, preprocess_image, scale_boxes

__all__ = ["ExpertPool", "OpenVinoSAM", "read_manifest"]

MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The deployment folder's ``manifest.json`` (experts, default expert, student config, parity reports)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: write the deployment with mdbench.papers.daft.deploy.export.save_deployment"
        )
    return json.loads(path.read_text())


class OpenVinoSAM:
    """One expert compiled for OpenVINO's CPU plugin, with the challenge pre- and post-processing in numpy.

    Args:
        folder: holds ``encoder.xml`` and ``decoder.xml`` (+ ``.bin``).
        core: an ``openvino.Core`` (shared by the experts of a pool, with its cache settings).
        threads: inference threads (None: OpenVINO's default, all cores).
    """

    def __init__(self, folder: str | Path, core: Any, threads: int | None = None) -> None:
        folder = Path(folder)
        config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16 on CPUs that have it: keeps parity with PyTorch
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        paths = {part: folder / f"{part}.xml" for part in ("encoder", "decoder")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"OpenVINO expert files missing: {missing}")
        # compiling from the path (not a read model) lets a warm CACHE_DIR skip reading and compiling the model
        self.encoder = core.compile_model(str(paths["encoder"]), "CPU", config)
        self.decoder = core.compile_model(str(paths["decoder"]), "CPU", config)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, 256, 256) preprocessed input -> (1, 256, 64, 64) float32 embedding."""
        return self.encoder(np.asarray(x, dtype=np.float32))[0]

    def embed(self, image: np.ndarray) -> np.ndarray:
        """(H, W[, 3]) image -> (1, 256, 64, 64) float32 embedding (challenge preprocessing)."""
        return self.encode(preprocess_image(image))

    def predict_from_embedding(self, embedding: np.ndarray, boxes: np.ndarray,
                               orig_hw: tuple[int, int]) -> np.ndarray:
        """(K, 4) xyxy boxes in original pixels -> (K, H, W) uint8 masks, one decoder call per box."""
        boxes_256 = scale_boxes(boxes, orig_hw)
        logits = np.concatenate([self.decoder([embedding, box[None]])[0] for box in boxes_256])
        return (postprocess_logits(logits, orig_hw) > 0).astype(np.uint8)


class ExpertPool:
    """The OpenVINO experts of a deployment folder.

    Args:
        folder: the deployment folder (``manifest.json``, ``openvino/<expert>/``).
        lazy: compile an expert on first use only; False compiles every expert now.
        cache_dir: OpenVINO's compiled-model cache folder (persists across processes), or None for no cache.
        threads: inference threads per model.
    """

    def __init__(self, folder: str | Path, lazy: bool = True, cache_dir: str | Path | None = None,
                 threads: int | None = None) -> None:
        import openvino as ov

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.experts = list(self.manifest["experts"])
        self.core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache_dir)})
        self.threads = threads
        self._loaded: dict[str, OpenVinoSAM] = {}
        if not lazy:
            for name in self.experts:
                self.get(name)

    @property
    def loaded(self) -> list[str]:
        """Experts compiled so far."""
        return list(self._loaded)

    def get(self, name: str) -> OpenVinoSAM:
        """The compiled expert ``name`` (compiled now if it is not yet)."""
        if name not in self.experts:
            raise KeyError(f"no expert {name!r} in {self.folder}; experts: {self.experts}")
        if name not in self._loaded:
            self._loaded[name] = OpenVinoSAM(self.folder / "openvino" / name, self.core, self.threads)
        return self._loaded[name]

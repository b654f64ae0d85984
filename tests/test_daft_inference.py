"""Case inference (2D label order, 3D slice propagation, embedding cache) and scoring, with bad input.

A stand-in predictor keeps these fast and exact: its "embedding" is the image itself, and the mask of a box is the
bright pixels inside the box, so propagation must follow the object slice by slice.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from mdbench.papers.daft.cases import read_cases
from mdbench.papers.daft.evaluation import modality_summary, score_case
from mdbench.papers.daft.experiment import CaseEvaluator
from mdbench.papers.daft.inference import segment_case


class BrightInBox:
    """Predictor stand-in: mask = (image > 127) inside the (inclusive, truncated) box."""

    def __init__(self) -> None:
        self.embedded = 0

    def embed(self, image: np.ndarray) -> np.ndarray:
        self.embedded += 1
        return np.asarray(image)

    def predict_from_embedding(self, embedding, boxes, orig_hw):
        grey = embedding if embedding.ndim == 2 else embedding[..., 0]
        masks = np.zeros((len(boxes), *orig_hw), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).astype(int)):
            masks[k, y0:y1 + 1, x0:x1 + 1] = grey[y0:y1 + 1, x0:x1 + 1] > 127
        return masks


def _volume(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(8, size, size) volume with two bright blocks on slices 1..6; block 1's x extent grows by 1 px per slice."""
    gts = np.zeros((8, size, size), np.uint8)
    for z in range(1, 7):
        gts[z, 4:12, 4:8 + z] = 1
        gts[z, 18:26, 10:20] = 2
    return np.where(gts > 0, 200, 20).astype(np.uint8), gts


def test_2d_labels_in_box_order_later_boxes_overwrite():
    image = np.full((20, 30, 3), 200, np.uint8)
    boxes = np.array([[0, 0, 9, 9], [5, 5, 14, 14]])
    labels = segment_case(BrightInBox(), {"imgs": image, "boxes": boxes, "dims": 2})
    assert labels.dtype == np.uint16 and labels.shape == (20, 30)
    assert labels[0, 0] == 1 and labels[7, 7] == 2 and labels[14, 14] == 2 and labels[19, 29] == 0


def test_2d_uint16_holds_more_than_255_objects():
    image = np.full((1, 600, 3), 200, np.uint8)
    boxes = np.array([[2 * k, 0, 2 * k, 0] for k in range(300)])
    labels = segment_case(BrightInBox(), {"imgs": image, "boxes": boxes, "dims": 2})
    assert labels.max() == 300 and labels[0, 598] == 300  # would wrap to 44 in uint8


@pytest.mark.parametrize("size", [256, 32])
def test_3d_propagation_from_the_middle_box(size):
    imgs, gts = _volume(size)
    # each box's 2D part is the object's box on the middle slice only (z_mid = 1 + 5 // 2 = 3, object 1 at x 4..10)
    boxes = np.array([[4, 4, 1, 10, 11, 6], [10, 18, 1, 19, 25, 6]])
    labels = segment_case(BrightInBox(), {"imgs": imgs, "boxes": boxes, "dims": 3})
    assert labels.dtype == np.uint16
    assert (labels[0] == 0).all() and (labels[7] == 0).all()  # outside the boxes' z range
    assert (labels[1:4] == gts[1:4]).all()  # middle slice and down to z_min included (the baseline stops above it)
    if size == 256:
        # the previous mask's box grows by 3 px of the 256 frame (= 3 px here): the growing object is followed
        assert (labels == gts).all()
    else:
        # 3 px of the 256 frame is 0.375 px of a 32 px image: the box cannot grow, object 1 stays at x 4..10
        assert (labels[4:7, 4:12, 4:11] == 1).all() and (labels[4:7, 4:12, 11:16] == 0).all()


def test_3d_embedding_cache_embeds_each_slice_once_with_the_same_masks():
    imgs, _ = _volume()
    boxes = np.array([[4, 4, 1, 12, 11, 6], [10, 18, 1, 19, 25, 6]])
    cached, uncached = BrightInBox(), BrightInBox()
    a = segment_case(cached, {"imgs": imgs, "boxes": boxes, "dims": 3}, cache_embeddings=True)
    b = segment_case(uncached, {"imgs": imgs, "boxes": boxes, "dims": 3}, cache_embeddings=False)
    assert (a == b).all()
    assert cached.embedded == 6  # slices 1..6, shared by both boxes
    assert uncached.embedded == 12  # the baseline: every slice of every box


class BatchedBrightInBox(BrightInBox):
    """BrightInBox that can also embed many images at once, as LiteMedSAM does."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def embed_many(self, images):
        self.batches.append(len(images))
        return np.stack([np.asarray(image) for image in images])  # embedding i: [i:i + 1], (1, H, W) grey slices

    def predict_from_embedding(self, embedding, boxes, orig_hw):
        return super().predict_from_embedding(embedding[0] if embedding.ndim == 3 else embedding, boxes, orig_hw)


def test_3d_batched_slices_give_the_same_masks_in_one_call():
    imgs, _ = _volume()
    boxes = np.array([[4, 4, 1, 12, 11, 6], [10, 18, 2, 19, 25, 7]])
    one_by_one, batched = BrightInBox(), BatchedBrightInBox()
    a = segment_case(one_by_one, {"imgs": imgs, "boxes": boxes, "dims": 3})
    b = segment_case(batched, {"imgs": imgs, "boxes": boxes, "dims": 3}, batch_slices=True)
    assert (a == b).all() and a.any()
    assert batched.batches == [7] and batched.embedded == 0  # slices 1..7 of both boxes, in one call
    uncached = BatchedBrightInBox()  # the baseline's per-box embedding is kept as it is
    segment_case(uncached, {"imgs": imgs, "boxes": boxes, "dims": 3}, cache_embeddings=False, batch_slices=True)
    assert uncached.batches == [] and uncached.embedded == 12


def test_litemedsam_embeds_many_images_as_it_embeds_one():
    from mdbench.models import build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = build_model("litemedsam").eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 52), dtype=np.uint8) for _ in range(3)]
    many = model.embed_many(images, batch_size=2)
    one = torch.cat([model.embed(image) for image in images])
    assert many.shape == (3, 256, 64, 64)
    assert float((many - one).abs().max()) <= 1e-4 * float(one.abs().max())


def test_3d_empty_previous_mask_falls_back_to_the_original_box():
    imgs = np.full((5, 16, 16), 20, np.uint8)
    imgs[2, 4:8, 4:8] = 200  # object only on the middle slice
    imgs[4, 4:8, 4:8] = 200  # and again two slices up, after an empty slice 3
    labels = segment_case(BrightInBox(), {"imgs": imgs, "boxes": np.array([[4, 4, 0, 7, 7, 4]]), "dims": 3})
    assert labels[2].sum() == 16 and labels[3].sum() == 0 and labels[4].sum() == 16


def _write(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def test_score_case_matches_the_challenge_rule_and_refuses_empty_ground_truth():
    gts = np.zeros((10, 10), np.uint8)
    gts[2:6, 2:6] = 1
    case = {"gts": gts, "dims": 2, "name": "2DBox_US_x.npz"}
    assert score_case(gts.astype(np.uint16), case) == {"dsc": 100.0, "nsd": 100.0}
    tiny = np.zeros_like(gts, dtype=np.uint16)
    tiny[2, 2] = 1  # DSC = 2 * 1 / (1 + 16) < 0.2: NSD forced to 0
    scores = score_case(tiny, case)
    assert scores["dsc"] == pytest.approx(100 * 2 / 17) and scores["nsd"] == 0.0
    with pytest.raises(ValueError, match="empty ground truth"):
        score_case(tiny, {**case, "gts": np.zeros_like(gts)})
    with pytest.raises(ValueError, match="no ground truth"):
        score_case(tiny, {"dims": 2, "name": "x"})


def test_batch_goes_on_past_bad_cases(tmp_path, caplog):
    image = np.full((16, 16, 3), 20, np.uint8)
    image[4:8, 4:8] = 200
    gts = (image[..., 0] > 127).astype(np.uint8)
    box = np.array([[4, 4, 7, 7]])
    paths = [
        _write(tmp_path / "2DBox_Endoscopy_good.npz", imgs=image, gts=gts, boxes=box),
        _write(tmp_path / "2DBox_Endoscopy_nokey.npz", imgs=image, gts=gts),
        _write(tmp_path / "2DBox_Endoscopy_emptygt.npz", imgs=image, gts=np.zeros_like(gts), boxes=box),
        _write(tmp_path / "2DBox_Histology_unknown.npz", imgs=image, gts=gts, boxes=box),
    ]
    with caplog.at_level(logging.WARNING):
        cases, errors = read_cases(paths, require_gts=False)  # as test inputs: an empty gts is scored as an error
    assert list(errors) == ["2DBox_Endoscopy_nokey.npz"] and "missing key" in caplog.text
    frame = CaseEvaluator({"m": BrightInBox()}).evaluate(cases, "m")
    assert frame["case"].tolist() == [p.name for p in paths if p.name not in errors]
    by_case = frame.set_index("case")
    assert by_case.loc["2DBox_Endoscopy_good.npz", "dsc"] == 100.0
    assert "empty ground truth" in by_case.loc["2DBox_Endoscopy_emptygt.npz", "error"]
    assert by_case.loc["2DBox_Histology_unknown.npz", "modality"] == "unknown"
    summary = modality_summary(frame)
    assert summary.loc["average", "dsc"] == 100.0 and summary.loc["average", "n"] == 2


def test_evaluator_segments_each_model_case_pair_once():
    predictor = BrightInBox()
    image = np.full((8, 8, 3), 200, np.uint8)
    case = {"imgs": image, "gts": np.ones((8, 8), np.uint8), "boxes": np.array([[0, 0, 7, 7]]), "dims": 2,
            "name": "2DBox_US_a.npz", "modality": "US"}
    evaluator = CaseEvaluator({"a": predictor})
    evaluator.evaluate([case], "a")
    evaluator.evaluate([case], lambda c: "a")
    assert predictor.embedded == 1
    with pytest.raises(KeyError, match="known"):
        evaluator.evaluate([case], "nope")


def test_threaded_scoring_gives_the_scores_of_one_thread_in_case_order():
    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):  # boxes of several sizes, some cutting the object: DSC and NSD differ from case to case
        gts = np.zeros((24, 24), np.uint8)
        gts[4:4 + i % 7 + 3, 5:15] = 1
        box = np.array([[5, 4, 8 + int(rng.integers(0, 8)), 4 + i % 7 + 2]])
        cases.append({"imgs": np.where(gts[..., None] > 0, 200, 20).repeat(3, -1).astype(np.uint8), "gts": gts,
                      "boxes": box, "dims": 2, "name": f"2DBox_US_{i}.npz", "modality": "US"})
    cases.append({**cases[0], "gts": np.zeros((24, 24), np.uint8), "name": "2DBox_US_empty.npz"})
    model = {case["name"]: "ab"[i % 2] for i, case in enumerate(cases)}
    filters = list(warnings.filters)
    frames = [CaseEvaluator({"a": BrightInBox(), "b": BrightInBox()}, workers=n).evaluate(
        cases + cases[:3], lambda case: model[case["name"]]) for n in (1, 4)]
    single, threaded = (f.drop(columns="seconds") for f in frames)
    assert warnings.filters == filters  # the scoring threads leave the process's warning filters as they were
    assert threaded.equals(single)
    assert threaded.case.tolist() == [c["name"] for c in cases + cases[:3]]
    assert threaded.dsc.iloc[:12].nunique() > 3 and "empty ground truth" in threaded.error.iloc[12]

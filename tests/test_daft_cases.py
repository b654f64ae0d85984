"""DAFT case folders and training items: real datasets converted to challenge cases, splits of any folder, tolerant
reading, and the sampled training items (one object, box with jitter, flips, 3D slices)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mdbench.data.boxprompt import boxes_from_labels, read_boxprompt_case
from mdbench.data.synthetic import write_synthetic_boxprompt_cases
from mdbench.papers.daft import cases as daft_cases
from mdbench.papers.daft.cases import MIN_OBJECT_PIXELS, case_splits, cases_checksum, read_cases, write_real_cases
from mdbench.papers.daft.inference import segment_case
from mdbench.papers.daft.training import PromptSamples, encoder_inputs


def test_real_datasets_become_challenge_cases(real_data_dir, tmp_path):
    written = write_real_cases(tmp_path, {"test": 1}, data_dir=real_data_dir)
    names = sorted(p.name.split("_")[1] for p in written["test"])
    assert names == ["Dermoscopy", "Endoscopy", "MR", "US"]
    cases, errors = read_cases(written["test"])
    assert errors == {} and sorted(c["modality"] for c in cases) == ["Dermoscopy", "Endoscopy", "MR", "US"]
    for case in cases:
        assert case["imgs"].dtype == np.uint8 and case["gts"].max() >= 1
        assert len(case["boxes"]) == case["gts"].max()  # labels 1..K, box k for label k + 1
        assert (case["boxes"] == boxes_from_labels(case["gts"])).all()
        if case["dims"] == 3:
            assert case["imgs"].ndim == 3 and case["gts"].max() == 2 and case["spacing"].shape == (3,)
        else:
            assert case["imgs"].shape[2] == 3
    again = write_real_cases(tmp_path, {"test": 1}, data_dir=real_data_dir)  # kept, not rewritten
    assert again == written and cases_checksum(read_cases(again["test"])[0]) == cases_checksum(cases)


def test_conversion_rule_by_hand(tmp_path, monkeypatch):
    # 2D: components of >= MIN_OBJECT_PIXELS px are objects, largest first; 3D: per-volume min-max to 0..255 (the
    # loader's "minmax"), labels renumbered 1..K (a volume without label 1 still gets box 0 for its object)
    mask = np.zeros((16, 16), np.uint8)
    mask[0:2, 0:10] = 1  # 20 px: kept, second
    mask[5:10, 5:10] = 1  # 25 px: kept, first
    mask[14:16, 14:16] = 1  # 4 px: dropped
    volume = np.linspace(0.0, 1.0, 4 * 8 * 8).reshape(1, 4, 8, 8)
    label = np.zeros((4, 8, 8), np.int64)
    label[1:3, 2:5, 2:5] = 2
    items = {
        "kvasir_seg": [{"id": "a", "mask": torch.from_numpy(mask), "image": torch.full((3, 16, 16), 0.5)}],
        "msd_hippocampus": [{"id": "v", "label": torch.from_numpy(label), "image": torch.from_numpy(volume),
                             "spacing": (1.0, 1.0, 1.0)}],
    }
    monkeypatch.setattr(daft_cases, "load_dataset", lambda name, **kwargs: items[name])
    written = write_real_cases(tmp_path, {"test": 1}, kinds=("2DBox_Endoscopy", "3DBox_MR"))["test"]
    two_d, three_d = (read_boxprompt_case(path) for path in written)
    assert MIN_OBJECT_PIXELS == 20 and two_d["gts"].max() == 2 and two_d["gts"][15, 15] == 0
    assert two_d["boxes"].tolist() == [[5, 5, 9, 9], [0, 0, 9, 1]] and (two_d["imgs"] == 128).all()
    assert three_d["gts"].max() == 1 and three_d["boxes"].tolist() == [[2, 2, 1, 4, 4, 2]]
    assert three_d["imgs"].min() == 0 and three_d["imgs"].max() == 255


def test_a_count_of_none_converts_every_item_of_the_split(tmp_path, monkeypatch):
    mask = np.zeros((16, 16), np.uint8)
    mask[5:10, 5:10] = 1
    items = [{"id": str(i), "mask": torch.from_numpy(mask), "image": torch.full((3, 16, 16), 0.5)} for i in range(3)]
    monkeypatch.setattr(daft_cases, "load_dataset", lambda name, **kwargs: items)
    assert len(write_real_cases(tmp_path / "all", {"test": None}, kinds=("2DBox_US",))["test"]) == 3
    assert len(write_real_cases(tmp_path / "two", {"test": 2}, kinds=("2DBox_US",))["test"]) == 2


def test_real_3d_case_runs_through_the_inference_with_a_stub(real_data_dir, tmp_path):
    [path] = write_real_cases(tmp_path, {"test": 1}, data_dir=real_data_dir, kinds=("3DBox_MR",))["test"]

    class Bright:  # mask = pixels brighter than the box's mean
        def embed(self, image):
            return image

        def predict_from_embedding(self, embedding, boxes, hw):
            out = np.zeros((len(boxes), *hw), np.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
                patch = embedding[y0:y1 + 1, x0:x1 + 1]
                out[k, y0:y1 + 1, x0:x1 + 1] = patch > patch.mean()
            return out

    case = read_boxprompt_case(path)
    labels = segment_case(Bright(), case)
    assert labels.shape == case["gts"].shape and set(np.unique(labels)) <= {0, 1, 2}


def test_case_splits_of_a_flat_folder_are_per_modality_and_disjoint(tmp_path):
    write_synthetic_boxprompt_cases(tmp_path, 4, kinds=("2DBox_US", "2DBox_Endoscopy"), image_size=(64, 64))
    (tmp_path / "2DBox_Fundus_only.npz").write_bytes(b"")  # too few of its modality to split: goes to test
    splits = case_splits(tmp_path)
    names = {split: {p.name for p in paths} for split, paths in splits.items()}
    assert sum(len(v) for v in names.values()) == 9 and not (names["train"] & names["test"])
    for modality in ("US", "Endoscopy"):
        assert all(any(modality in n for n in names[split]) for split in ("train", "val", "test"))
    assert "2DBox_Fundus_only.npz" in names["test"]
    with pytest.raises(FileNotFoundError, match="no challenge"):
        case_splits(tmp_path / "empty")


def test_read_cases_skips_bad_files_with_messages(tmp_path):
    [good] = write_synthetic_boxprompt_cases(tmp_path, 1, kinds=("2DBox_US",), image_size=(64, 64))
    case = dict(np.load(good))
    np.savez_compressed(tmp_path / "2DBox_US_nobox.npz", imgs=case["imgs"], gts=case["gts"])
    np.savez_compressed(tmp_path / "2DBox_US_empty.npz", imgs=case["imgs"], gts=np.zeros_like(case["gts"]),
                        boxes=case["boxes"])
    cases, errors = read_cases([good, tmp_path / "2DBox_US_nobox.npz", tmp_path / "2DBox_US_empty.npz"])
    assert [c["name"] for c in cases] == [good.name]
    assert "missing key" in errors["2DBox_US_nobox.npz"] and "empty ground truth" in errors["2DBox_US_empty.npz"]


def _case_2d() -> dict:
    gts = np.zeros((128, 64), np.uint8)
    gts[10:30, 5:25] = 1
    gts[80:120, 30:60] = 2
    return {"imgs": np.zeros((128, 64, 3), np.uint8), "gts": gts, "dims": 2, "name": "2DBox_US_a.npz"}


def test_training_items_one_object_box_with_jitter_and_fixed_validation_items():
    torch.manual_seed(0)
    samples = PromptSamples([_case_2d()], augment=True)
    seen = set()
    for _ in range(20):
        image, mask, box = samples[0]
        assert image.shape == (3, 256, 256) and mask.shape == (1, 256, 256)
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)
        jitter = torch.cat([tight[:2] - box[:2], box[2:] - tight[2:]])
        assert ((jitter >= 0) & (jitter <= 5)).all()  # each side moved out by 0..5 px (clipped at the border)
        seen.add((int(mask.sum()), bool(mask[0, :, :128].sum() == 0)))
    assert len({area for area, _ in seen}) == 2  # both objects drawn (scaled 2x: 40x40 and 80x60 px)
    assert any(flipped for _, flipped in seen)  # horizontal flips move the objects to the right half
    fixed = PromptSamples([_case_2d()], augment=False, seed=3)
    assert all(torch.equal(fixed[0][1], fixed[0][1]) for _ in range(3))


def test_volume_items_random_or_all_slices(tmp_path):
    [path] = write_synthetic_boxprompt_cases(tmp_path, 1, kinds=("3DBox_MR",), volume_shape=(8, 48, 48))
    [case], _ = read_cases([path])
    with_object = int(case["gts"].reshape(8, -1).any(1).sum())
    assert len(PromptSamples([case], slices="random")) == 1
    assert len(PromptSamples([case], slices="all")) == with_object
    assert len(PromptSamples([case], slices="all", max_slices=2)) == min(2, with_object)
    inputs, names = encoder_inputs([case], slices_per_volume=2)
    assert inputs.shape == (min(2, with_object), 3, 256, 256)
    slices = np.flatnonzero(case["gts"].reshape(8, -1).any(1))  # the first and last slice with an object
    assert names == [f"{case['name']}@z{z}" for z in sorted({slices[0], slices[-1]})]
    with pytest.raises(ValueError, match="no case"):
        PromptSamples([{**case, "gts": np.zeros_like(case["gts"])}])

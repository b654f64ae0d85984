"""Real-dataset loaders: the shared subsets (sampled, skipped when absent) and tiny files in each
official layout written by the tests, including every kind of bad input."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mdbench.data import CorruptFileError, DataNotFoundError, LabelError, load_dataset
from mdbench.data.hc18 import HC18Dataset, fill_annotation
from mdbench.data.isic2017 import ISIC2017Dataset
from mdbench.data.kvasir_seg import KvasirSegDataset
from mdbench.data.msd_hippocampus import MSDHippocampusDataset
from mdbench.data.pbc import PBCDataset
from mdbench.data.pneumoniamnist import PneumoniaMNISTDataset
from mdbench.data.ucsb_breast import UCSBBreastDataset

from conftest import real_dataset

LOADERS = (PneumoniaMNISTDataset, PBCDataset, ISIC2017Dataset, KvasirSegDataset, HC18Dataset,
           MSDHippocampusDataset, UCSBBreastDataset)


def _splits(name: str, root: Path, **kwargs) -> dict:
    return {s: load_dataset(name, s, data_dir=root, **kwargs) for s in ("train", "val", "test")}


def _check_partition(parts: dict, total: int) -> None:
    sets = [set(d.indices.tolist()) for d in parts.values()]
    assert sum(len(s) for s in sets) == total
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _outline(filled: np.ndarray) -> np.ndarray:
    """1-pixel inner boundary of a filled region, as in the original HC18 annotations."""
    inner = filled.copy()
    core = filled[1:-1, 1:-1]
    inner[1:-1, 1:-1] = core & filled[:-2, 1:-1] & filled[2:, 1:-1] & filled[1:-1, :-2] & filled[1:-1, 2:]
    return filled & ~inner


# ================================ the shared subsets ================================================

REAL = [  # name, loader kwargs, total cases (from the shared data README)
    ("pbc", {}, 960),
    ("isic2017", {}, 1000),
    ("isic2017", {"task": "segmentation"}, 1000),
    ("kvasir_seg", {}, 500),
    ("hc18", {}, 200),
    ("msd_hippocampus", {}, 130),
    ("ucsb_breast", {}, 58),
]


@pytest.mark.real_data
@pytest.mark.parametrize("name,kwargs,total", REAL, ids=[n + "-" + k.get("task", "") for n, k, _ in REAL])
def test_real_splits_partition_deterministically_with_stable_checksum(real_data_dir, name, kwargs, total):
    real_dataset(real_data_dir, name)
    parts = _splits(name, real_data_dir, **kwargs)
    _check_partition(parts, total)
    again = load_dataset(name, "test", data_dir=real_data_dir, **kwargs)
    assert np.array_equal(again.indices, parts["test"].indices)
    assert again.checksum == parts["train"].checksum == parts["test"].checksum
    other_seed = load_dataset(name, "test", data_dir=real_data_dir, seed=1, **kwargs)
    assert not np.array_equal(other_seed.indices, parts["test"].indices)


@pytest.mark.real_data
def test_real_pneumoniamnist_official_splits(real_data_dir):
    real_dataset(real_data_dir, "pneumoniamnist")
    parts = _splits("pneumoniamnist", real_data_dir)
    assert {k: len(v) for k, v in parts.items()} == {"train": 4708, "val": 524, "test": 624}
    assert parts["val"].checksum == parts["test"].checksum
    image, label = parts["test"][623]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0 <= image.min() <= image.max() <= 1
    assert label in (0, 1) and set(np.unique(parts["train"].labels)) == {0, 1}
    rgb, _ = load_dataset("pneumoniamnist", "val", data_dir=real_data_dir, channels=3, image_size=64)[0]
    assert rgb.shape == (3, 64, 64) and torch.equal(rgb[0], rgb[2])


@pytest.mark.real_data
def test_real_classification_items_and_stratification(real_data_dir):
    real_dataset(real_data_dir, "pbc")
    pbc = load_dataset("pbc", "all", data_dir=real_data_dir)
    assert np.bincount(pbc.labels).tolist() == [120] * 8
    test = load_dataset("pbc", "test", data_dir=real_data_dir, image_size=64)
    assert np.bincount(np.asarray(pbc.labels)[test.indices]).tolist() == [18] * 8  # 144 / 8 classes
    image, label = test[5]
    assert image.shape == (3, 64, 64) and 0 <= image.min() <= image.max() <= 1 and 0 <= label < 8
    assert test.files[5].parent.name == pbc.classes[label]

    real_dataset(real_data_dir, "isic2017")
    isic = load_dataset("isic2017", "all", data_dir=real_data_dir)
    assert np.bincount(isic.labels).tolist() == [187, 127, 686]  # melanoma, SK, nevus
    image, label = load_dataset("isic2017", "val", data_dir=real_data_dir, image_size=32)[0]
    assert image.shape == (3, 32, 32) and label in (0, 1, 2)


@pytest.mark.real_data
@pytest.mark.parametrize("name,kwargs", [("kvasir_seg", {}), ("isic2017", {"task": "segmentation"}),
                                          ("hc18", {})])
def test_real_segmentation_items(real_data_dir, name, kwargs):
    real_dataset(real_data_dir, name)
    ds = load_dataset(name, "val", data_dir=real_data_dir, **kwargs)
    for i in (0, len(ds) - 1):
        item = ds[i]
        image, mask = item["image"], item["mask"]
        assert image.shape[0] == 3 and image.shape[1:] == mask.shape and image.dtype == torch.float32
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1}
        assert 0 <= image.min() <= image.max() <= 1 and isinstance(item["id"], str)
        assert ds.has_foreground(i) == bool(mask.any())
    resized = load_dataset(name, "val", data_dir=real_data_dir, image_size=64, **kwargs)[0]
    assert resized["image"].shape == (3, 64, 64) and resized["mask"].shape == (64, 64)


@pytest.mark.real_data
def test_real_hc18_masks_agree_with_the_listed_head_circumference(real_data_dir):
    real_dataset(real_data_dir, "hc18")
    ds = load_dataset("hc18", "test", data_dir=real_data_dir)
    for i in (0, 7, 19):
        item = ds[i]
        mask = item["mask"].numpy().astype(bool)
        assert np.array_equal(fill_annotation(mask), mask)  # the shared copy is already filled
        # semi-axes of a filled ellipse from its second moments (variance a^2 / 4), then Ramanujan's perimeter
        ys, xs = np.nonzero(mask)
        a, b = 2 * np.sqrt(np.linalg.eigvalsh(np.cov(np.stack([ys, xs]))))
        perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        assert perimeter * item["spacing"][0] == pytest.approx(item["hc_mm"], rel=0.05)


@pytest.mark.real_data
def test_real_msd_hippocampus_volumes(real_data_dir):
    real_dataset(real_data_dir, "msd_hippocampus")
    ds = load_dataset("msd_hippocampus", "test", data_dir=real_data_dir)
    item = ds[3]
    image, label = item["image"], item["label"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[1:] == label.shape
    assert set(label.unique().tolist()) == {0, 1, 2} and item["spacing"] == (1.0, 1.0, 1.0)
    assert abs(float(image.mean())) < 1e-4 and float(image.std()) == pytest.approx(1, abs=1e-3)
    assert ds.classes == ("background", "anterior", "posterior") and ds.files[3].name.startswith(item["id"])
    resampled = load_dataset("msd_hippocampus", "test", data_dir=real_data_dir, spatial_size=(32, 48, 32))[3]
    assert resampled["image"].shape == (1, 32, 48, 32) and resampled["label"].shape == (32, 48, 32)
    assert set(resampled["label"].unique().tolist()) == {0, 1, 2}
    ratio = [s / n for s, n in zip(label.shape, (32, 48, 32), strict=True)]
    assert resampled["spacing"] == pytest.approx(ratio)


@pytest.mark.real_data
def test_real_ucsb_breast_bags(real_data_dir):
    real_dataset(real_data_dir, "ucsb_breast")
    everything = load_dataset("ucsb_breast", "all", data_dir=real_data_dir)
    assert sum(len(b) for b in everything.bags) == 2002
    assert np.bincount(everything.labels).tolist() == [32, 26]
    x, y = everything[0]
    assert x.dtype == torch.float32 and x.shape[1] == 708 and y in (0, 1)
    train = load_dataset("ucsb_breast", "train", data_dir=real_data_dir, standardize=True)
    stacked = torch.cat([train[i][0] for i in range(len(train))])
    assert stacked.mean(0).abs().max() < 1e-3 and len(train.bag_ids) == len(train)
    folds = [load_dataset("ucsb_breast", "test", data_dir=real_data_dir, fold=f, k=4) for f in range(4)]
    assert sorted(np.concatenate([f.bag_ids for f in folds]).tolist()) == everything.bag_ids.tolist()


# ================================ tiny files in the official layouts ================================

def _jpg(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)
    return path


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.fixture
def pbc_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("basophil", "platelet"):
        for k in range(4):
            _jpg(tmp_path / "pbc" / "PBC_dataset_normal_DIB" / cls / f"{cls}_{k}.jpg",
                 rng.integers(0, 256, (12, 10, 3)))
    return tmp_path / "pbc"


def test_tiny_pbc(pbc_dir):
    parts = {s: PBCDataset(pbc_dir, s) for s in ("train", "val", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 4, "val": 2, "test": 2}
    _check_partition(parts, 8)
    for ds in parts.values():  # stratified: both classes in every split; platelet keeps its official id 7
        assert sorted(ds[i][1] for i in range(len(ds))) == [0] * (len(ds) // 2) + [7] * (len(ds) // 2)
    image, _ = parts["train"][0]
    assert image.shape == (3, 12, 10)
    grey, _ = PBCDataset(pbc_dir, "train", image_size=6, channels=1)[0]
    assert grey.shape == (1, 6, 6)
    assert len(parts["train"].checksum) == 64


def test_tiny_pbc_bad_input(pbc_dir):
    broken = sorted((pbc_dir / "PBC_dataset_normal_DIB" / "platelet").iterdir())[0]
    _truncate(broken)
    ds = PBCDataset(pbc_dir, "all")
    with pytest.raises(CorruptFileError, match=str(broken)):
        ds[ds.files.index(broken)]
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(CorruptFileError, match=str(broken)):
        ds[ds.files.index(broken)]
    (pbc_dir / "PBC_dataset_normal_DIB" / "macrophage").mkdir()
    with pytest.raises(LabelError, match="macrophage"):
        PBCDataset(pbc_dir)


@pytest.mark.parametrize("loader", LOADERS, ids=lambda c: c.name)
def test_missing_folder_names_it_and_says_how_to_fix(tmp_path, loader):
    with pytest.raises(DataNotFoundError) as err:
        loader(tmp_path / "absent", split="test")
    assert str(tmp_path / "absent") in str(err.value) and "MDBENCH_DATA_DIR" in str(err.value)


def _pneumonia_npz(path: Path, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    arrays.update(override)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "pneumoniamnist.npz", **arrays)
    return path


def test_tiny_pneumoniamnist(tmp_path):
    folder = _pneumonia_npz(tmp_path / "pneumoniamnist")
    raw = np.load(folder / "pneumoniamnist.npz")
    ds = PneumoniaMNISTDataset(folder, "test")
    assert len(ds) == 3 and [ds[i][1] for i in range(3)] == [0, 1, 0]
    image, _ = ds[2]
    assert torch.equal(image[0], torch.from_numpy(raw["test_images"][2] / np.float32(255)))
    rgb, _ = PneumoniaMNISTDataset(folder, "test", channels=3)[2]
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[1], image[0])
    with pytest.raises(ValueError, match="split"):
        PneumoniaMNISTDataset(folder, "all")


def test_tiny_pneumoniamnist_bad_input(tmp_path):
    with pytest.raises(DataNotFoundError, match="pneumoniamnist.npz"):
        PneumoniaMNISTDataset(tmp_path)
    bad_label = _pneumonia_npz(tmp_path / "labels", val_labels=np.array([[0], [2]], dtype=np.uint8))
    with pytest.raises(LabelError, match="outside"):
        PneumoniaMNISTDataset(bad_label, "val")
    no_key = tmp_path / "nokey"
    no_key.mkdir()
    np.savez(no_key / "pneumoniamnist.npz", train_images=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(CorruptFileError, match="pneumoniamnist.npz"):
        PneumoniaMNISTDataset(no_key, "train")
    (no_key / "pneumoniamnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CorruptFileError, match="pneumoniamnist.npz"):
        PneumoniaMNISTDataset(no_key, "train")


@pytest.fixture
def kvasir_dir(tmp_path) -> Path:
    base = tmp_path / "kvasir_seg" / "Kvasir-SEG"
    rng = np.random.default_rng(1)
    for k in range(3):
        mask = np.zeros((16, 16), np.uint8)
        if k:  # case 0 has no polyp
            mask[0:8, 8:16] = 255  # one whole 8x8 JPEG block: no compression ringing across it
        _jpg(base / "images" / f"case{k}.jpg", rng.integers(0, 256, (16, 16, 3)))
        _jpg(base / "masks" / f"case{k}.jpg", mask)
    return tmp_path / "kvasir_seg"


def test_tiny_kvasir(kvasir_dir, caplog):
    ds = KvasirSegDataset(kvasir_dir, "all")
    item = ds[1]
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[0:8, 8:16] = 1
    assert item["id"] == "case1" and item["image"].shape == (3, 16, 16)
    assert torch.equal(item["mask"], expected)
    assert [ds.has_foreground(i) for i in range(3)] == [False, True, True]
    with caplog.at_level(logging.INFO, logger="mdbench.data.base"):
        fg = KvasirSegDataset(kvasir_dir, "all", foreground_only=True)
    assert [fg[i]["id"] for i in range(len(fg))] == ["case1", "case2"]
    assert "skipped 1 of 3" in caplog.text
    small = KvasirSegDataset(kvasir_dir, "all", image_size=4)[2]["mask"]
    assert small.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_tiny_kvasir_bad_input(kvasir_dir):
    masks = kvasir_dir / "Kvasir-SEG" / "masks"
    _jpg(masks / "case2.jpg", np.zeros((15, 16), np.uint8))
    ds = KvasirSegDataset(kvasir_dir, "all")
    with pytest.raises(LabelError, match="case2.jpg"):
        ds[2]
    (masks / "case2.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="case2.jpg"):
        KvasirSegDataset(kvasir_dir, "all")


def _hc18(tmp_path: Path, outline: bool) -> tuple[Path, np.ndarray]:
    folder = tmp_path / "hc18"
    head = _ellipse(40, 60, 20, 30, 12, 20)
    annotation = _outline(head) if outline else head
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    for k in range(3):
        _png(folder / "training_set" / f"00{k}_HC.png", np.full((40, 60), 50 + k))
        _png(folder / "training_set" / f"00{k}_HC_Annotation.png", annotation * 255)
        rows.append(f"00{k}_HC.png,0.5,{10 + k}")
    (folder / "training_set_pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")
    return folder, head


@pytest.mark.parametrize("outline", [True, False], ids=["outline", "filled"])
def test_tiny_hc18_fills_outline_annotations(tmp_path, outline):
    folder, head = _hc18(tmp_path, outline)
    ds = HC18Dataset(folder, "all")
    item = ds[1]
    assert item["id"] == "001_HC" and item["hc_mm"] == 10 + 1 and item["spacing"] == (0.5, 0.5)
    assert item["image"].shape == (3, 40, 60) and torch.equal(item["image"][0], item["image"][2])
    assert np.array_equal(item["mask"].numpy().astype(bool), head)
    resized = HC18Dataset(folder, "all", image_size=20)[1]
    assert resized["spacing"] == (0.5 * 40 / 20, 0.5 * 60 / 20)


def test_fill_annotation_of_outline_cut_by_the_border():
    whole = _ellipse(40, 80, 20, 50, 12, 20)  # drawn on a wider canvas, then cut at column 60:
    outline, head = _outline(whole)[:, :60], whole[:, :60]  # the cut outline encloses no hole
    assert np.array_equal(fill_annotation(outline), head)
    assert not fill_annotation(np.zeros((5, 5), bool)).any()


def test_tiny_hc18_bad_input(tmp_path):
    folder, _ = _hc18(tmp_path, outline=True)
    _png(folder / "training_set" / "002_HC_Annotation.png", np.zeros((40, 61)))
    with pytest.raises(LabelError, match="002_HC_Annotation.png"):
        HC18Dataset(folder, "all")[2]
    (folder / "training_set" / "001_HC_Annotation.png").unlink()
    with pytest.raises(DataNotFoundError, match="001_HC_Annotation.png"):
        HC18Dataset(folder, "all")


def _isic(tmp_path: Path) -> Path:
    folder = tmp_path / "isic2017"
    rows = ["image_id,melanoma,seborrheic_keratosis"]
    for k, (mel, sk) in enumerate([(1, 0), (0, 1), (0, 0), (0, 0)]):
        rows.append(f"ISIC_000000{k},{mel}.0,{sk}.0")
        if k < 3:  # the 4th row's image is not on disk, as in the shared subset of a full CSV
            _jpg(folder / "ISIC-2017_Training_Data" / f"ISIC_000000{k}.jpg", np.full((8, 8, 3), 60 * k))
            mask = np.zeros((8, 8))
            mask[2:6, 2:6] = 255
            _png(folder / "ISIC-2017_Training_Part1_GroundTruth" / f"ISIC_000000{k}_segmentation.png", mask)
    _png(folder / "ISIC-2017_Training_Data" / "ISIC_0000000_superpixels.png", np.zeros((8, 8)))
    (folder / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_tiny_isic2017(tmp_path, caplog):
    folder = _isic(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mdbench.data.isic2017"):
        cls = ISIC2017Dataset(folder, "all")
    assert "1 rows" in caplog.text and "ISIC-2017_Training_Part3_GroundTruth.csv" in caplog.text
    assert [cls[i][1] for i in range(len(cls))] == [0, 1, 2]
    seg = ISIC2017Dataset(folder, "all", task="segmentation", image_size=4)
    item = seg[2]
    assert item["id"] == "ISIC_0000002" and item["image"].shape == (3, 4, 4)
    assert item["mask"].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert seg.checksum != cls.checksum  # segmentation also read the masks


def test_tiny_isic2017_bad_input(tmp_path):
    folder = _isic(tmp_path)
    _jpg(folder / "ISIC-2017_Training_Data" / "ISIC_0000009.jpg", np.zeros((8, 8, 3)))
    with pytest.raises(LabelError, match="ISIC_0000009.jpg"):
        ISIC2017Dataset(folder, "all")
    (folder / "ISIC-2017_Training_Data" / "ISIC_0000009.jpg").unlink()
    csv = folder / "ISIC-2017_Training_Part3_GroundTruth.csv"
    csv.write_text(csv.read_text().replace("ISIC_0000000,1.0,0.0", "ISIC_0000000,1.0,1.0"))
    with pytest.raises(LabelError, match="ISIC_0000000"):
        ISIC2017Dataset(folder, "all")


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    nib.save(img, path)


def _msd(tmp_path: Path, n: int = 3) -> Path:
    task = tmp_path / "msd_hippocampus" / "Task04_Hippocampus"
    rng = np.random.default_rng(0)
    training = []
    for k in range(n):
        name = f"hippocampus_00{k}.nii.gz"
        _nifti(task / "imagesTr" / name, rng.normal(100, 20, (6, 7, 8)).astype(np.float32), (1.0, 1.0, 2.0))
        label = np.zeros((6, 7, 8), np.uint8)
        label[1:3, 2:4, 3:5], label[3:5, 2:4, 3:5] = 1, 2
        _nifti(task / "labelsTr" / name, label)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "Hippocampus", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": n, "training": training}
    (task / "dataset.json").write_text(json.dumps(meta))
    return tmp_path / "msd_hippocampus"


def test_tiny_msd_hippocampus(tmp_path):
    folder = _msd(tmp_path)
    parts = {s: MSDHippocampusDataset(folder, s) for s in ("train", "val", "test")}
    _check_partition(parts, 3)
    ds = MSDHippocampusDataset(folder, "all")
    item = ds[1]
    assert item["id"] == "hippocampus_001" and item["spacing"] == (1.0, 1.0, 2.0)
    assert item["image"].shape == (1, 6, 7, 8) and item["label"].shape == (6, 7, 8)
    assert item["label"].dtype == torch.int64 and int((item["label"] == 2).sum()) == 2 * 2 * 2
    assert abs(float(item["image"].mean())) < 1e-5
    assert float(item["image"].std()) == pytest.approx(1, abs=1e-3)
    raw = np.asarray(nib.load(ds.files[1]).dataobj)
    mm = MSDHippocampusDataset(folder, "all", normalize="minmax")[1]["image"][0].numpy()
    assert np.allclose(mm, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_tiny_msd_hippocampus_padded_at_its_own_resolution(tmp_path):
    folder = _msd(tmp_path)
    own = MSDHippocampusDataset(folder, "all", normalize="minmax")[1]
    padded = MSDHippocampusDataset(folder, "all", normalize="minmax", spatial_size=(8, 8, 9), resize="pad")[1]
    assert padded["image"].shape == (1, 8, 8, 9) and padded["label"].shape == (8, 8, 9)
    assert padded["extent"] == own["extent"] == (6, 7, 8) and padded["spacing"] == own["spacing"] == (1.0, 1.0, 2.0)
    # the volume sits in the corner, voxel for voxel; zeros after the end of each axis
    assert torch.equal(padded["image"][:, :6, :7, :8], own["image"])
    assert torch.equal(padded["label"][:6, :7, :8], own["label"])
    outside = torch.ones(8, 8, 9, dtype=torch.bool)
    outside[:6, :7, :8] = False
    assert not padded["image"][0][outside].any() and not padded["label"][outside].any()
    resampled = MSDHippocampusDataset(folder, "all", spatial_size=(8, 8, 9))[1]
    assert resampled["extent"] == (8, 8, 9) and resampled["spacing"] == pytest.approx((0.75, 7 / 8, 16 / 9))
    with pytest.raises(ValueError, match=r"hippocampus_001.nii.gz has shape \(6, 7, 8\), larger than"):
        MSDHippocampusDataset(folder, "all", spatial_size=(8, 6, 9), resize="pad")[1]
    with pytest.raises(ValueError, match="resize must be"):
        MSDHippocampusDataset(folder, "all", spatial_size=(8, 8, 9), resize="crop")


def test_tiny_msd_hippocampus_bad_input(tmp_path):
    folder = _msd(tmp_path)
    task = folder / "Task04_Hippocampus"
    labels = task / "labelsTr"
    bad = np.zeros((6, 7, 8), np.uint8)
    bad[0, 0, 0] = 3
    _nifti(labels / "hippocampus_000.nii.gz", bad)
    with pytest.raises(LabelError, match=r"hippocampus_000.nii.gz.*\[3\]"):
        MSDHippocampusDataset(folder, "all")[0]
    _nifti(labels / "hippocampus_001.nii.gz", np.zeros((6, 7, 9), np.uint8))
    with pytest.raises(LabelError, match="hippocampus_001.nii.gz"):
        MSDHippocampusDataset(folder, "all")[1]
    _nifti(task / "imagesTr" / "hippocampus_002.nii.gz", np.zeros((6, 7, 8, 2), np.float32))
    with pytest.raises(LabelError, match="3D"):
        MSDHippocampusDataset(folder, "all")[2]
    (task / "imagesTr" / "hippocampus_002.nii.gz").write_bytes(gzip.compress(b"garbage" * 10)[:30])
    with pytest.raises(CorruptFileError, match="hippocampus_002.nii.gz"):
        MSDHippocampusDataset(folder, "all")[2]
    (task / "imagesTr" / "hippocampus_002.nii.gz").unlink()
    with pytest.raises(DataNotFoundError, match="hippocampus_002.nii.gz"):
        MSDHippocampusDataset(folder, "all")


def _ucsb(path: Path, bag_label: np.ndarray | None = None) -> Path:
    bag_id = np.repeat(np.arange(1, 11), 3).astype(np.int16)  # 10 bags of 3 instances
    labels = bag_label if bag_label is not None else (bag_id > 5).astype(np.int8)
    features = np.arange(30 * 708, dtype=np.float16).reshape(30, 708) % 97
    path.mkdir(parents=True)
    np.savez(path / "ucsb_breast_mil.npz", features=features, bag_id=bag_id, bag_label=labels)
    return path


def test_tiny_ucsb_breast_standardizes_with_train_statistics_only(tmp_path):
    folder = _ucsb(tmp_path / "ucsb_breast")
    raw = np.load(folder / "ucsb_breast_mil.npz")
    train = UCSBBreastDataset(folder, "train", standardize=True)
    test = UCSBBreastDataset(folder, "test", standardize=True)
    assert len(train) + len(UCSBBreastDataset(folder, "val")) + len(test) == 10
    rows = np.isin(raw["bag_id"], train.bag_ids)
    mean = raw["features"][rows].astype(np.float64).mean(0)
    std = raw["features"][rows].astype(np.float64).std(0)
    x, y = test[0]
    bag = raw["features"][raw["bag_id"] == test.bag_ids[0]].astype(np.float64)
    assert x.shape == (3, 708) and y == int(test.bag_ids[0] > 5)
    expected = (bag - mean) / np.where(std == 0, 1, std)
    assert np.allclose(x.numpy(), expected, atol=1e-4)


def test_tiny_ucsb_breast_bad_input(tmp_path):
    mixed = np.zeros(30, np.int8)
    mixed[4] = 1  # bag 2 holds instances labelled 0 and 1
    with pytest.raises(LabelError, match="bag 2"):
        UCSBBreastDataset(_ucsb(tmp_path / "mixed", mixed), "all")
    with pytest.raises(ValueError, match="fold"):
        UCSBBreastDataset(_ucsb(tmp_path / "ok"), "test", fold=5, k=5)

"""Registry, data root, splits and checksums of the real-dataset layer (no dataset decoding here)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from mdbench.data import (
    DATASETS,
    CorruptFileError,
    DataNotFoundError,
    UnknownDatasetError,
    data_root,
    dataset_table,
    get_spec,
    is_present,
    kfold_splits,
    load_dataset,
    split_indices,
    tree_checksum,
    verify_sha256sums,
)
from mdbench.data.pbc import PBCDataset

from conftest import REPO_ROOT, real_dataset

NAMES = ("pneumoniamnist", "pbc", "isic2017", "kvasir_seg", "hc18", "msd_hippocampus", "ucsb_breast")


# --- registry -----------------------------------------------------------------------------------

def test_registry_lists_the_seven_real_datasets_with_cards_and_loaders():
    assert set(DATASETS) == set(NAMES)
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.folder == name
        assert (REPO_ROOT / spec.card).is_file(), f"data card {spec.card} missing"
        assert callable(spec.loader) and spec.classes and spec.licence and spec.citation and spec.source
        # the registry's class list is the one the loader uses (msd reads its own from dataset.json)
        assert getattr(spec.loader, "classes", spec.classes) == spec.classes


def test_unknown_dataset_name_lists_known_names():
    with pytest.raises(UnknownDatasetError) as err:
        get_spec("chexpert")
    assert isinstance(err.value, KeyError)
    assert "chexpert" in str(err.value) and all(n in str(err.value) for n in NAMES)
    with pytest.raises(UnknownDatasetError):
        load_dataset("chexpert", data_dir=".")


def test_data_root_explicit_argument_beats_environment(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("MDBENCH_DATA_DIR", str(tmp_path / "a"))
    assert data_root() == tmp_path / "a"
    assert data_root(tmp_path / "b") == tmp_path / "b"


def test_data_root_unset_or_missing_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="MDBENCH_DATA_DIR"):
        data_root()
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("MDBENCH_DATA_DIR", str(missing))
    with pytest.raises(DataNotFoundError) as err:
        data_root()
    assert str(missing) in str(err.value) and "MDBENCH_DATA_DIR" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def _tiny_pbc_root(root: Path) -> Path:
    from PIL import Image

    for cls in ("basophil", "eosinophil"):
        (root / "pbc" / "PBC_dataset_normal_DIB" / cls).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (8, 8), (40 * k, 10, 200)).save(
                root / "pbc" / "PBC_dataset_normal_DIB" / cls / f"{k}.jpg")
    _write_sums(root / "pbc", [f"PBC_dataset_normal_DIB/{cls}/{k}.jpg" for cls in ("basophil", "eosinophil")
                               for k in range(4)])  # load_dataset verifies before reading
    return root


def test_presence_table_and_dispatch(tmp_path, monkeypatch):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    assert not is_present("pbc")  # no root at all is "absent", not an error
    root = _tiny_pbc_root(tmp_path)
    assert is_present("pbc", root) and not is_present("hc18", root)
    rows = {r["name"]: r for r in dataset_table(root)}
    assert set(rows) == set(NAMES)
    assert rows["pbc"]["present"] and not rows["kvasir_seg"]["present"]
    assert rows["pbc"]["path"] == str(root / "pbc")
    assert set(rows["pbc"]) == {"name", "task", "modality", "licence", "present", "path"}
    assert all(r["path"] is None for r in dataset_table())

    ds = load_dataset("pbc", split="all", data_dir=root, image_size=4)
    assert isinstance(ds, PBCDataset) and len(ds) == 8 and ds[0][0].shape == (3, 4, 4)


def test_loading_an_absent_dataset_names_its_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("kvasir_seg", data_dir=tmp_path)
    assert str(tmp_path / "kvasir_seg") in str(err.value) and "MDBENCH_DATA_DIR" in str(err.value)


# --- splits --------------------------------------------------------------------------------------

def test_stratified_split_sizes_and_class_counts_worked_by_hand():
    labels = np.array([0] * 80 + [1] * 20)
    parts = split_indices(100, labels, seed=0)
    # test = ceil(0.15 * 100) = 15 cases, 20 % of them class 1 = 3; val likewise 15 (3); train the rest.
    assert {k: len(v) for k, v in parts.items()} == {"train": 70, "val": 15, "test": 15}
    assert [int(labels[parts[k]].sum()) for k in ("train", "val", "test")] == [14, 3, 3]
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(100))


def test_split_is_deterministic_and_seed_dependent():
    a, b = split_indices(50, seed=0), split_indices(50, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], split_indices(50, seed=1)["test"])


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.15, 0.15), (0.0, 0.5, 0.5), (0.9, -0.1, 0.2)])
def test_bad_split_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_indices(20, fractions=fractions)


def test_kfold_partitions_cases_with_stratified_folds():
    labels = np.array([0] * 10 + [1] * 5)
    folds = kfold_splits(labels, k=5, seed=0)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(15))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == 15
        assert labels[test].tolist().count(1) == 1  # 5 positives over 5 folds


# --- checksums -----------------------------------------------------------------------------------

def _write_sums(folder: Path, names: list[str], binary: bool = False) -> None:
    mark = " *" if binary else "  "
    lines = [hashlib.sha256((folder / n).read_bytes()).hexdigest() + mark + n for n in names]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_verify_sha256sums_reports_ok_missing_and_mismatched(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in [("a.txt", "alpha"), ("sub/b.txt", "beta"), ("c.txt", "gamma")]:
        (tmp_path / name).write_text(text)
    _write_sums(tmp_path, ["a.txt", "sub/b.txt", "c.txt"], binary=True)
    assert verify_sha256sums(tmp_path).passed
    (tmp_path / "sub" / "b.txt").write_text("BETA")
    (tmp_path / "c.txt").unlink()
    report = verify_sha256sums(tmp_path)
    assert (report.ok, report.mismatched, report.missing) == (["a.txt"], ["sub/b.txt"], ["c.txt"])
    assert not report.passed


def test_verify_sha256sums_refuses_missing_or_malformed_list(tmp_path):
    with pytest.raises(DataNotFoundError, match="SHA256SUMS"):
        verify_sha256sums(tmp_path)
    (tmp_path / "SHA256SUMS").write_text("not-a-digest  a.txt\n")
    with pytest.raises(CorruptFileError, match="line 1"):
        verify_sha256sums(tmp_path)


def test_tree_checksum_definition_order_and_root_independence(tmp_path):
    for root in (tmp_path / "x", tmp_path / "y" / "deeper"):
        (root / "d").mkdir(parents=True)
        (root / "a.txt").write_bytes(b"1")
        (root / "d" / "b.txt").write_bytes(b"2")
    x = [tmp_path / "x" / "a.txt", tmp_path / "x" / "d" / "b.txt"]
    y = [tmp_path / "y" / "deeper" / "d" / "b.txt", tmp_path / "y" / "deeper" / "a.txt"]
    expected = hashlib.sha256(b"a.txt\0" + hashlib.sha256(b"1").digest()
                              + b"d/b.txt\0" + hashlib.sha256(b"2").digest()).hexdigest()
    assert tree_checksum(x) == tree_checksum(y) == expected
    (tmp_path / "x" / "a.txt").write_bytes(b"3")
    assert tree_checksum(x) != expected
    assert tree_checksum([tmp_path / "y" / "deeper" / "a.txt"], root=tmp_path / "y") != tree_checksum(
        [tmp_path / "y" / "deeper" / "a.txt"])  # the relative name is part of the checksum


@pytest.mark.real_data
@pytest.mark.parametrize("name", NAMES)
def test_shared_folders_match_their_sha256sums(real_data_dir, name):
    report = verify_sha256sums(real_dataset(real_data_dir, name))
    assert report.passed, report.summary()


@pytest.mark.real_data
def test_modified_copy_of_shared_folder_is_detected(real_data_dir, tmp_path):
    copy = tmp_path / "ucsb_breast"
    shutil.copytree(real_dataset(real_data_dir, "ucsb_breast"), copy)
    assert verify_sha256sums(copy).passed
    data = bytearray((copy / "ucsb_breast_mil.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "ucsb_breast_mil.npz").write_bytes(bytes(data))
    assert verify_sha256sums(copy).mismatched == ["ucsb_breast_mil.npz"]

"""Data integrity by default: load_dataset checks each dataset folder against its SHA256SUMS, with a hash cache
keyed by (path, size, mtime_ns), an in-process memo, and an explicit, recorded opt-out."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdbench import repro
from mdbench.data import checksums, registry
from mdbench.data.checksums import hash_cache_path, verification_state, verify_sha256sums
from mdbench.data.errors import DataError, DataIntegrityError, DataNotFoundError, UnverifiedDataWarning
from mdbench.data.registry import data_root, load_dataset

from conftest import real_dataset

pytestmark = pytest.mark.usefixtures("fresh_data_verification")


def write_sums(folder: Path) -> None:
    """``sha256sum``-format list of every file under ``folder`` (computed here, independently of mdbench)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}" for n in names if n != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def age(folder: Path, seconds_ago: int = 3600) -> None:
    """Set every file's mtime into the past, as for data copied long ago (fresh files are not cached)."""
    past = time.time_ns() - seconds_ago * 10**9
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(past, past))


def tiny_pbc(root: Path, per_class: int = 3) -> Path:
    """``<root>/pbc`` in PBC's official layout (two classes of 8x8 JPEGs) with its SHA256SUMS."""
    for c, cls in enumerate(("basophil", "platelet")):
        (root / "pbc" / "PBC_dataset_normal_DIB" / cls).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (8, 8), (30 * k, 100 * c, 50)).save(
                root / "pbc" / "PBC_dataset_normal_DIB" / cls / f"{cls}_{k}.jpg")
    write_sums(root / "pbc")
    age(root / "pbc")
    return root / "pbc"


def tiny_pneumonia(root: Path) -> Path:
    """``<root>/pneumoniamnist/pneumoniamnist.npz`` in MedMNIST's format with its SHA256SUMS."""
    rng = np.random.default_rng(0)
    folder = root / "pneumoniamnist"
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(folder / "pneumoniamnist.npz", **arrays)
    write_sums(folder)
    age(folder)
    return folder


def counting_sha256(monkeypatch) -> list[Path]:
    """Record every file that verification actually reads."""
    calls: list[Path] = []
    real = checksums.file_sha256

    def counted(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(checksums, "file_sha256", counted)
    return calls


# --- load_dataset refuses data that does not match its SHA256SUMS --------------------------------------

def test_clean_copy_loads(tmp_path):
    tiny_pneumonia(tmp_path)
    assert len(load_dataset("pneumoniamnist", "test", data_dir=tmp_path)) == 4
    assert repro.fingerprint()["data_verification"] == "sha256"


def test_flipped_labels_stop_the_load_naming_dataset_file_and_fix(tmp_path):
    folder = tiny_pneumonia(tmp_path)
    with np.load(folder / "pneumoniamnist.npz") as npz:
        arrays = dict(npz)
    arrays["test_labels"] = 1 - arrays["test_labels"]  # same size, same format: only the checksum tells
    np.savez(folder / "pneumoniamnist.npz", **arrays)
    with pytest.raises(DataIntegrityError) as err:
        load_dataset("pneumoniamnist", "test", data_dir=tmp_path)
    message = str(err.value)
    assert "'pneumoniamnist'" in message and str(folder) in message
    assert "mismatched:" in message and "pneumoniamnist.npz" in message
    assert "MDBENCH_VERIFY_DATA=0" in message and "mdbench data check pneumoniamnist" in message
    assert isinstance(err.value, DataError)


def test_missing_file_stops_the_load(tmp_path):
    folder = tiny_pbc(tmp_path)
    (folder / "PBC_dataset_normal_DIB" / "platelet" / "platelet_1.jpg").unlink()
    with pytest.raises(DataIntegrityError, match=r"missing: +PBC_dataset_normal_DIB/platelet/platelet_1\.jpg"):
        load_dataset("pbc", "all", data_dir=tmp_path)


def test_unlisted_file_and_folder_stop_the_load(tmp_path):
    folder = tiny_pbc(tmp_path)
    images = folder / "PBC_dataset_normal_DIB"
    shutil.copy(images / "basophil" / "basophil_0.jpg", images / "basophil" / "extra.jpg")
    (images / "platelet" / "more").mkdir()
    (images / "platelet" / "more" / "a.jpg").write_bytes(b"x")
    (images / "platelet" / "more" / "b.jpg").write_bytes(b"y")
    with pytest.raises(DataIntegrityError) as err:
        load_dataset("pbc", "all", data_dir=tmp_path)
    message = str(err.value)
    assert "unlisted:" in message and "PBC_dataset_normal_DIB/basophil/extra.jpg" in message
    assert "PBC_dataset_normal_DIB/platelet/more/" in message and "more/a.jpg" not in message  # folder once
    assert "0 mismatched, 0 missing, 2 unlisted" in message


def test_hidden_files_count_but_file_manager_metadata_does_not(tmp_path):
    folder = tiny_pbc(tmp_path)
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / "PBC_dataset_normal_DIB" / "Thumbs.db").write_bytes(b"explorer")
    assert len(load_dataset("pbc", "all", data_dir=tmp_path)) == 6
    # a loader's glob would read this one as an image of class basophil
    (folder / "PBC_dataset_normal_DIB" / "basophil" / "._basophil_0.jpg").write_bytes(b"AppleDouble")
    assert verify_sha256sums(folder).unlisted == ["PBC_dataset_normal_DIB/basophil/._basophil_0.jpg"]


def test_at_most_ten_bad_files_are_named(tmp_path):
    folder = tiny_pbc(tmp_path, per_class=7)
    for k in range(7):
        (folder / "PBC_dataset_normal_DIB" / "basophil" / f"basophil_{k}.jpg").unlink()
        (folder / "PBC_dataset_normal_DIB" / "platelet" / f"platelet_{k}.jpg").write_bytes(b"changed")
    with pytest.raises(DataIntegrityError) as err:
        load_dataset("pbc", "all", data_dir=tmp_path)
    message = str(err.value)
    named = [line for line in message.splitlines() if line.startswith(("  missing:", "  mismatched:"))]
    assert len(named) == 10 and "... and 4 more" in message
    assert "7 mismatched, 7 missing, 0 unlisted" in message


def test_folder_without_sha256sums_names_the_fix(tmp_path):
    folder = tiny_pbc(tmp_path)
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(DataIntegrityError) as err:
        load_dataset("pbc", "all", data_dir=tmp_path)
    message = str(err.value)
    assert str(folder) in message and "no SHA256SUMS" in message
    assert "sha256sum" in message and "--no-verify-data" in message and "MDBENCH_VERIFY_DATA=0" in message


def test_data_root_that_is_a_file_says_so_and_names_both_ways_to_set_it(tmp_path, monkeypatch):
    a_file = tmp_path / "data.tar"
    a_file.write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="is a file, not a folder") as err:
        data_root(a_file)
    assert "(from --data-dir)" in str(err.value) and "data_dir=" not in str(err.value)
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError) as err:
        data_root()
    # the command line's flag and the environment variable; the Python argument is for readers of the code
    assert all(s in str(err.value) for s in ("MDBENCH_DATA_DIR", "--data-dir DIR")) and "data_dir=" not in str(err.value)


@pytest.mark.real_data
def test_modified_copy_of_real_dataset_is_refused(real_data_dir, tmp_path):
    shutil.copytree(real_dataset(real_data_dir, "ucsb_breast"), tmp_path / "clean" / "ucsb_breast")
    assert len(load_dataset("ucsb_breast", "all", data_dir=tmp_path / "clean")) == 58
    shutil.copytree(real_data_dir / "ucsb_breast", tmp_path / "bad" / "ucsb_breast")
    npz = tmp_path / "bad" / "ucsb_breast" / "ucsb_breast_mil.npz"
    with np.load(npz) as original:
        arrays = dict(original)
    arrays["features"][0, 0] += 1  # a valid file with one feature changed: only the checksum tells
    np.savez_compressed(npz, **arrays)
    with pytest.raises(DataIntegrityError, match="ucsb_breast_mil.npz"):
        load_dataset("ucsb_breast", "all", data_dir=tmp_path / "bad")


# --- the opt-out is explicit, warned once and recorded ------------------------------------------------

def _corrupt_pneumonia(root: Path) -> Path:
    folder = tiny_pneumonia(root)
    (folder / "extra.txt").write_text("not listed")
    return folder


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_env_opt_out_loads_modified_data_warns_once_and_is_recorded(tmp_path, monkeypatch, value):
    _corrupt_pneumonia(tmp_path)
    monkeypatch.setenv("MDBENCH_VERIFY_DATA", value)
    assert verification_state() == f"off (MDBENCH_VERIFY_DATA={value})"  # known before any load
    with pytest.warns(UnverifiedDataWarning, match="pneumoniamnist") as caught:
        load_dataset("pneumoniamnist", "test", data_dir=tmp_path)
        load_dataset("pneumoniamnist", "val", data_dir=tmp_path)
    assert len([w for w in caught if w.category is UnverifiedDataWarning]) == 1
    state = repro.fingerprint()["data_verification"]
    assert state == f"off for pneumoniamnist (MDBENCH_VERIFY_DATA={value})"


def test_verify_keyword_overrides_the_environment(tmp_path, monkeypatch):
    _corrupt_pneumonia(tmp_path)
    with pytest.warns(UnverifiedDataWarning):
        assert len(load_dataset("pneumoniamnist", "test", data_dir=tmp_path, verify=False)) == 4
    assert verification_state() == "off for pneumoniamnist (verify=False)"
    monkeypatch.setenv("MDBENCH_VERIFY_DATA", "0")
    with pytest.raises(DataIntegrityError, match="extra.txt"):
        load_dataset("pneumoniamnist", "test", data_dir=tmp_path, verify=True)


def test_unknown_opt_out_value_is_refused(tmp_path, monkeypatch):
    tiny_pneumonia(tmp_path)
    monkeypatch.setenv("MDBENCH_VERIFY_DATA", "maybe")
    with pytest.raises(DataError, match="MDBENCH_VERIFY_DATA='maybe'"):
        load_dataset("pneumoniamnist", "test", data_dir=tmp_path)


# --- hash cache and in-process memo ------------------------------------------------------------------

def test_second_verification_reads_nothing_unchanged_and_modified_files_are_read_again(tmp_path, monkeypatch):
    folder = tiny_pbc(tmp_path)
    listed = len((folder / "SHA256SUMS").read_text().splitlines())
    calls = counting_sha256(monkeypatch)
    assert verify_sha256sums(folder, use_cache=True).passed and len(calls) == listed
    assert hash_cache_path().is_file() and hash_cache_path().is_relative_to(tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["PBC_dataset_normal_DIB", "SHA256SUMS"]  # nothing written

    calls.clear()
    report = verify_sha256sums(folder, use_cache=True)
    assert report.passed and report.hashed == 0 and calls == []

    changed = folder / "PBC_dataset_normal_DIB" / "basophil" / "basophil_1.jpg"
    touched = folder / "PBC_dataset_normal_DIB" / "platelet" / "platelet_2.jpg"
    mtime = changed.stat().st_mtime_ns
    changed.write_bytes(bytes(b ^ 0xFF for b in changed.read_bytes()))  # same size
    os.utime(changed, ns=(mtime + 10**9, mtime + 10**9))
    os.utime(touched, ns=(mtime - 10**9, mtime - 10**9))  # same bytes, other mtime
    calls.clear()
    report = verify_sha256sums(folder, use_cache=True)
    assert sorted(calls) == sorted([changed, touched])
    assert report.mismatched == ["PBC_dataset_normal_DIB/basophil/basophil_1.jpg"]

    calls.clear()
    assert verify_sha256sums(folder).hashed == listed == len(calls)  # without use_cache: every byte again


def test_files_modified_moments_ago_are_not_cached(tmp_path, monkeypatch):
    folder = tiny_pneumonia(tmp_path)
    os.utime(folder / "pneumoniamnist.npz")  # now: a later change in the same mtime tick would go unseen
    calls = counting_sha256(monkeypatch)
    verify_sha256sums(folder, use_cache=True)
    verify_sha256sums(folder, use_cache=True)
    assert len(calls) == 2


@pytest.mark.parametrize("content", [b"\x00garbage{", b'["a", "list"]', b'{"version": 1, "files": {"/x": [1]}}',
                                     b'{"version": 99, "files": {}}'])
def test_corrupt_cache_file_is_treated_as_empty_and_rewritten(tmp_path, monkeypatch, caplog, content):
    folder = tiny_pneumonia(tmp_path)
    hash_cache_path().parent.mkdir(parents=True)
    hash_cache_path().write_bytes(content)
    calls = counting_sha256(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mdbench.data.checksums"):
        assert verify_sha256sums(folder, use_cache=True).passed
    assert len(calls) == 1
    calls.clear()
    assert verify_sha256sums(folder, use_cache=True).passed and calls == []  # the cache works again


def test_unwritable_cache_never_stops_verification(tmp_path, monkeypatch, caplog):
    folder = tiny_pneumonia(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    monkeypatch.setenv("MDBENCH_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="mdbench.data.checksums"):
        assert verify_sha256sums(folder, use_cache=True).passed
    assert "could not write the hash cache" in caplog.text


def test_one_process_verifies_a_dataset_once(tmp_path, monkeypatch):
    tiny_pneumonia(tmp_path)
    runs = []
    real = registry.verify_sha256sums
    monkeypatch.setattr(registry, "verify_sha256sums", lambda *a, **k: runs.append(a) or real(*a, **k))
    for split in ("train", "val", "test"):
        load_dataset("pneumoniamnist", split, data_dir=tmp_path)
    assert len(runs) == 1


def test_cache_persists_across_processes(tmp_path):
    """A second process re-reads nothing unchanged (the cache is on disk, not only in memory)."""
    import subprocess
    import sys

    folder = tiny_pbc(tmp_path)
    script = ("import sys; from mdbench.data.checksums import verify_sha256sums; "
              "r = verify_sha256sums(sys.argv[1], use_cache=True); print(r.passed, r.hashed)")
    env = {**os.environ, "MDBENCH_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs == [["True", "6"], ["True", "0"]]


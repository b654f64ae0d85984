"""`mdbench data check`: fails (exit 1) on any missing, mismatched or unlisted file and names each one; clear
messages for a data path that is a file, no data path at all, and unknown dataset names."""
from __future__ import annotations

import os
import shutil

import pytest
from test_data_integrity import tiny_pbc, tiny_pneumonia

from mdbench import cli
from mdbench.data.registry import DATASETS

pytestmark = pytest.mark.usefixtures("fresh_data_verification")


@pytest.fixture
def root(tmp_path):
    data = tmp_path / "data"
    tiny_pbc(data, per_class=50)  # 100 files: one bad file among many good ones, as in the review
    tiny_pneumonia(data)
    return data


def check(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["data", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_clean_copy_passes(root, capsys):
    code, out, _ = check(capsys, "--data-dir", str(root))
    assert code == 0, out
    assert "pbc              ok" in out and "100 ok, 0 missing, 0 mismatched, 0 unlisted" in out
    assert "pneumoniamnist   ok" in out and "hc18             absent" in out


@pytest.mark.parametrize("kind", ["mismatched", "missing", "unlisted"])
def test_each_bad_file_is_named_with_its_kind_and_fails(root, capsys, kind):
    images = root / "pbc" / "PBC_dataset_normal_DIB" / "basophil"
    if kind == "mismatched":
        (images / "basophil_7.jpg").write_bytes(b"")  # a zero-byte image
        expected = f"{images}/basophil_7.jpg"
    elif kind == "missing":
        (images / "basophil_7.jpg").unlink()
        expected = f"{images}/basophil_7.jpg"
    else:  # an extra class folder
        extra = images.parent / "macrophage"
        extra.mkdir()
        shutil.copy(images / "basophil_0.jpg", extra / "m_0.jpg")
        expected = f"{extra}/"
    code, out, _ = check(capsys, "--data-dir", str(root))
    assert code == 1, out
    assert f"  {kind:<11} {expected}" in out.splitlines()
    assert "pbc              FAILED" in out and f"1 {kind}" in out
    assert "pneumoniamnist   ok" in out  # the other datasets are still checked
    assert "1 dataset(s) failed: pbc" in out


def test_check_rereads_every_byte_unless_fast(root, capsys):
    assert check(capsys, "--data-dir", str(root))[0] == 0  # fills the hash cache
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    stat = npz.stat()
    data = bytearray(npz.read_bytes())
    data[-100] ^= 0x01
    npz.write_bytes(bytes(data))
    os.utime(npz, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the bytes differ
    assert check(capsys, "pneumoniamnist", "--fast", "--data-dir", str(root))[0] == 0  # trusts the cache
    code, out, _ = check(capsys, "pneumoniamnist", "--data-dir", str(root))
    assert code == 1 and f"  mismatched  {npz}" in out.splitlines()


def test_missing_or_malformed_sha256sums_fails_that_dataset_only(root, capsys):
    (root / "pbc" / "SHA256SUMS").unlink()
    code, out, _ = check(capsys, "--data-dir", str(root))
    assert code == 1 and "pbc              FAILED" in out and "no checksum list" in out
    (root / "pbc" / "SHA256SUMS").write_text("xyz  a.jpg\n")
    code, out, _ = check(capsys, "--data-dir", str(root))
    assert code == 1 and "line 1" in out and "pneumoniamnist   ok" in out


def test_dataset_named_but_absent_fails_and_empty_root_fails(root, tmp_path, capsys):
    code, out, _ = check(capsys, "pbc", "hc18", "--data-dir", str(root))
    assert code == 1 and "hc18             absent" in out and "failed: hc18" in out
    (tmp_path / "empty").mkdir()
    code, out, _ = check(capsys, "--data-dir", str(tmp_path / "empty"))
    assert code == 1 and "no dataset found" in out and "--data-dir" in out


def test_data_path_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "data.zip"
    a_file.write_bytes(b"PK")
    for command in ("check", "list"):
        assert cli.main(["data", command, "--data-dir", str(a_file)]) == 2
        err = capsys.readouterr().err
        assert f"{a_file}" in err and "is a file, not a folder" in err and "--data-dir" in err


def test_no_data_dir_names_the_flag_and_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    assert cli.main(["data", "check"]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "MDBENCH_DATA_DIR" in err


def test_unknown_name_is_refused_with_the_known_names_before_hashing(root, capsys):
    code, out, err = check(capsys, "pbc", "imagenet", "--data-dir", str(root))
    assert code == 2 and out == ""
    assert "imagenet" in err and all(name in err for name in DATASETS)


@pytest.mark.real_data
def test_shared_data_passes(real_data_dir, capsys):
    code, out, _ = check(capsys, "--data-dir", str(real_data_dir))
    assert code == 0, out
    assert sum(line.split()[1] == "ok" for line in out.splitlines() if line.strip()) == len(DATASETS)

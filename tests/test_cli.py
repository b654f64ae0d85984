"""The `mdbench` command's doctor and data commands."""
from __future__ import annotations

import pytest

from mdbench import cli
from mdbench.data.registry import DATASETS


def test_doctor_reports_kernel_packages_and_data(real_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("MDBENCH_DATA_DIR", str(real_data_dir))
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "kernel python3" in out and "torch" in out
    assert f"{len(DATASETS)}/{len(DATASETS)} datasets present" in out
    assert code == 0, out


def test_doctor_explains_missing_data_dir(monkeypatch, capsys):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    assert cli.main(["doctor"]) == 1
    assert "MDBENCH_DATA_DIR is not set" in capsys.readouterr().out


def test_data_list_shows_all_datasets_present_with_licences(real_data_dir, capsys):
    assert cli.main(["data", "list", "--data-dir", str(real_data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(DATASETS) == 7
    for line, spec in zip(lines, DATASETS.values(), strict=True):
        assert line.split()[:2] == [spec.name, "yes"] and spec.licence in line


def test_data_check_fails_on_a_modified_file(tmp_path, capsys):
    folder = tmp_path / "ucsb_breast"
    folder.mkdir()
    (folder / "ucsb_breast_mil.npz").write_bytes(b"tampered")
    (folder / "SHA256SUMS").write_text("0" * 64 + "  ucsb_breast_mil.npz\n")
    assert cli.main(["data", "check", "ucsb_breast", "--data-dir", str(tmp_path)]) == 1
    assert "1 mismatched" in capsys.readouterr().out


def test_unknown_dataset_and_missing_data_dir(tmp_path, monkeypatch, capsys):
    assert cli.main(["data", "check", "imagenet", "--data-dir", str(tmp_path)]) == 2
    assert "imagenet" in capsys.readouterr().err
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    assert cli.main(["data", "check"]) == 2
    assert "MDBENCH_DATA_DIR" in capsys.readouterr().err


def test_unknown_profile_is_refused_by_argparse():
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--profile", "huge"])

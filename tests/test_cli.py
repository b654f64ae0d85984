"""The `mdbench` command: quick to answer (nothing heavy imported), help that lists papers and profiles, doctor and
data commands, and messages that name command-line flags."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mdbench import cli, doctor, runner
from mdbench.data.registry import DATASETS

HEAVY = ("torch", "pandas", "papermill", "nbformat", "scipy", "sklearn")


def test_help_doctor_and_data_list_import_nothing_heavy():
    """Importing torch alone takes seconds on a cold start: --help, doctor and data list must not need it."""
    code = f"""
import contextlib, io, sys
from mdbench import cli
for argv in (["--help"], ["reproduce", "--help"], ["data", "list"], ["doctor"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:  # --help
            pass
print([name for name in {HEAVY!r} if name in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_is_plain_text_and_reproduce_help_lists_papers_and_profiles(capsys):
    top = _help(capsys)
    assert "``" not in top and ":func:" not in top
    assert "mdbench reproduce --profile smoke" in top and "--data-dir DIR" in top
    text = _help(capsys, "reproduce")
    assert "``" not in text
    papers = runner.load_papers()
    assert [p.paper for p in papers] == ["quickstart", "med_tuning", "efcm", "rd", "daft"]
    for paper in papers:  # name, expected minutes at smoke/cpu/gpu, title
        assert f"{paper.paper} " in text and paper.title in text
        assert "/".join(f"{paper.minutes[p]:g}" for p in ("smoke", "cpu", "gpu")) in text
    for name in runner.available_profiles():
        assert f"  {name}  " in text and runner.load_profile(name).description in text
    assert "needs no data and no GPU" in text and "needs --data-dir DIR (or MDBENCH_DATA_DIR) and a CUDA GPU" in text


def test_help_still_answers_when_a_paper_yaml_is_broken(monkeypatch, capsys):
    def broken(*_args):
        raise runner.PaperFileError("papers/x/paper.yaml lacks the key title")

    monkeypatch.setattr(runner, "load_papers", broken)
    assert "papers: cannot be listed: papers/x/paper.yaml lacks the key title" in _help(capsys, "reproduce")


def test_doctor_reports_kernel_packages_and_data(real_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("MDBENCH_DATA_DIR", str(real_data_dir))
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "kernel python3" in out and "torch" in out
    assert f"{len(DATASETS)}/{len(DATASETS)} datasets present" in out
    assert code == 0, out


def test_doctor_reports_missing_data_as_a_note_and_exits_0(monkeypatch, capsys):
    monkeypatch.delenv("MDBENCH_DATA_DIR", raising=False)
    assert cli.main(["doctor"]) == 0  # the smoke profile needs no data
    out = capsys.readouterr().out
    assert "\nproblems:" not in out and "no problems: `mdbench reproduce --profile smoke` can run here" in out
    notes = out.split("notes:")[1]
    assert "no data folder: --profile smoke runs on synthetic data" in notes and "--data-dir DIR" in notes


def test_doctor_exits_1_for_what_stops_the_smoke_profile(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "package_versions", lambda: {"papermill": "not installed"})
    assert cli.main(["doctor"]) == 1
    problems = capsys.readouterr().out.split("problems:")[1]
    assert "papermill is not installed: run `make .venv`" in problems


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
    err = capsys.readouterr().err
    # the command line's flag, not the Python API's argument
    assert "pass --data-dir DIR (or set MDBENCH_DATA_DIR)" in err and "data_dir=" not in err


def test_unknown_profile_is_refused_by_argparse():
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--profile", "huge"])

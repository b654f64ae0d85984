"""The one atomic-write helper: old file kept and no temporary file left when a write fails."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mdbench import io
from mdbench.data.boxprompt import save_boxprompt_case
from mdbench.data.checksums import _load_cache, _save_cache
from mdbench.results import ResultStore
from mdbench.train import save_atomic


def test_bytes_text_and_writer_functions_land_readable_by_others(tmp_path):
    assert io.atomic_write(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    path = io.atomic_write(tmp_path / "sub" / "b.md", "ü\n")  # the folder is made; text is UTF-8
    assert path.read_bytes() == "ü\n".encode()
    io.atomic_write(tmp_path / "c.npy", lambda handle: np.save(handle, np.arange(3)))
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2]
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "a.bin", path)} == {0o644}


@pytest.mark.parametrize("fail_in", ["writer", "fsync", "rename"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch, fail_in):
    target = tmp_path / "table.csv"
    io.atomic_write(target, "old\n")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    def half_then_fail(handle):
        handle.write(b"half a ")
        fail()

    if fail_in != "writer":
        monkeypatch.setattr(io.os, fail_in if fail_in == "fsync" else "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, half_then_fail if fail_in == "writer" else "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_an_interrupt_mid_write_also_cleans_up(tmp_path):
    def interrupted(handle):
        handle.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(tmp_path / "x.json", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot create the folder .*file/sub of x.json"):
        io.atomic_write(blocker / "sub" / "x.json", "{}")


def test_every_writer_of_the_suite_goes_through_it(tmp_path, monkeypatch):
    written = []
    real = io.atomic_write

    def spy(path, data):
        written.append(path.name)
        return real(path, data)

    for module in ("mdbench.train", "mdbench.data.boxprompt", "mdbench.data.checksums", "mdbench.results"):
        monkeypatch.setattr(f"{module}.atomic_write", spy)
    save_atomic({"epoch": 1}, tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}
    imgs = np.zeros((8, 8, 3), np.uint8)
    gts = np.zeros((8, 8), np.uint8)
    gts[2:5, 2:5] = 1
    save_boxprompt_case(tmp_path / "2DBox_US_a.npz", imgs, gts, np.array([[2, 2, 4, 4]]))
    _save_cache(tmp_path / "sha256.json", "d/", {"d/f": [1, 2, "0" * 64]})
    assert _load_cache(tmp_path / "sha256.json", "d/") == {"d/f": [1, 2, "0" * 64]}
    assert json.loads((tmp_path / "sha256.json").read_text())["files"] == {"d/f": [1, 2, "0" * 64]}
    ResultStore("toy", "smoke", root=tmp_path).save_table(pd.DataFrame({"a": [1]}), "t")
    assert written == ["last.pt", "2DBox_US_a.npz", "sha256.json", "t.csv", "t.md"]

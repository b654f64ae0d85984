"""The cache of units of work behind resumable runs (mdbench.work): hits, misses, damaged files, atomic writes,
trainings continued inside a unit, and the session's wiring."""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mdbench import notebook, train, work
from mdbench.params import NotebookConfig

CONFIG = {"lr": 0.1, "epochs": 2}


@pytest.fixture
def calls():
    return collections.Counter()


def unit(calls, seed: int) -> dict:
    """A unit of work's typical value: per-sample outputs and a number, different per seed."""
    calls[seed] += 1
    rng = np.random.default_rng(seed)
    return {"outputs": pd.DataFrame({"seed": seed, "unit": range(3), "value": rng.random(3)}), "mean": seed / 2}


def cache(tmp_path, config=CONFIG, resume=True, lines=None):
    return work.WorkCache(tmp_path / "work", config, resume=resume, log=(lines if lines is not None else []).append)


def test_a_stored_unit_is_loaded_on_resume_and_computed_again_without(tmp_path, calls):
    first = cache(tmp_path, resume=False)
    values = {seed: first("seed", partial(unit, calls, seed), seed=seed) for seed in (0, 1)}
    assert calls == {0: 1, 1: 1} and (tmp_path / "work" / "seed" / "seed=1.pt").is_file()

    lines = []
    resumed = cache(tmp_path, lines=lines)
    again = resumed("seed", partial(unit, calls, 1), seed=1)
    assert calls == {0: 1, 1: 1}  # loaded, not computed
    pd.testing.assert_frame_equal(again["outputs"], values[1]["outputs"])
    assert again["mean"] == 0.5 and resumed.loaded == [tmp_path / "work" / "seed" / "seed=1.pt"]
    assert lines[0].startswith("work seed seed=1: loaded (computed ")

    fresh = cache(tmp_path, resume=False)  # without resume every unit is computed and stored again
    fresh("seed", partial(unit, calls, 1), seed=1)
    assert calls[1] == 2 and fresh.computed == [tmp_path / "work" / "seed" / "seed=1.pt"]
    assert work.uncached("seed", partial(unit, calls, 1), seed=1)["mean"] == 0.5 and calls[1] == 3


def test_another_config_or_code_is_a_miss(tmp_path, calls, monkeypatch):
    cache(tmp_path, resume=False)("seed", partial(unit, calls, 0), seed=0)
    lines = []
    cache(tmp_path, config={**CONFIG, "lr": 0.2}, lines=lines)("seed", partial(unit, calls, 0), seed=0)
    assert calls[0] == 2 and lines[0] == "work seed seed=0: stored with another config or code; computing it again"
    assert re.fullmatch(r"work seed seed=0: computed in \d+ s", lines[1]) and len(lines) == 2
    cache(tmp_path, config={**CONFIG, "lr": 0.2})("seed", partial(unit, calls, 0), seed=0)
    assert calls[0] == 2  # the new config's unit replaced the old one
    monkeypatch.setattr(work, "code_hash", lambda: "other code")
    cache(tmp_path, config={**CONFIG, "lr": 0.2})("seed", partial(unit, calls, 0), seed=0)
    assert calls[0] == 3


def test_the_key_decides_the_file_and_must_be_plain(tmp_path, calls):
    store = cache(tmp_path)
    store("fold", partial(unit, calls, 0), dataset="pbc cells", seed=0, fold=3)
    store("baseline", partial(unit, calls, 1))
    assert sorted(p.relative_to(tmp_path / "work").as_posix() for p in (tmp_path / "work").rglob("*.pt")) == [
        "baseline/all.pt", "fold/dataset=pbc_cells__seed=0__fold=3.pt"]
    with pytest.raises(work.WorkCacheError, match=r"seeds=\(0, 1\): a key value must be a str, int or float"):
        store("seed", partial(unit, calls, 0), seeds=(0, 1))


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_a_damaged_unit_is_reported_and_computed_again(tmp_path, calls, damage):
    cache(tmp_path, resume=False)("seed", partial(unit, calls, 0), seed=0)
    path = tmp_path / "work" / "seed" / "seed=0.pt"
    data = path.read_bytes()
    damaged = {"truncate": data[:-10], "flip": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
               "header": b"not json\n" + data}[damage]
    path.write_bytes(damaged)
    with pytest.warns(UserWarning, match=r"cannot read the stored unit of work .*seed=0\.pt .*computing it again"):
        value = cache(tmp_path)("seed", partial(unit, calls, 0), seed=0)
    assert calls[0] == 2 and value["mean"] == 0.0 and path.read_bytes() != damaged  # stored whole again
    with pytest.raises(work.WorkCacheError, match="no stored unit of work"):
        cache(tmp_path).header(tmp_path / "work" / "seed" / "seed=0.pt.missing")


def test_a_failed_unit_stores_nothing_and_keeps_the_last_good_one(tmp_path, calls):
    store = cache(tmp_path, resume=False)
    store("seed", partial(unit, calls, 0), seed=0)
    before = (tmp_path / "work" / "seed" / "seed=0.pt").read_bytes()
    with pytest.raises(AttributeError):  # a lambda cannot be pickled: the write fails before the rename
        store("seed", lambda: {"model": lambda x: x}, seed=0)
    with pytest.raises(ZeroDivisionError):
        store("seed", lambda: 1 / 0, seed=1)
    folder = tmp_path / "work" / "seed"
    assert sorted(p.name for p in folder.iterdir()) == ["seed=0.pt"] and (folder / "seed=0.pt").read_bytes() == before


def train_two(calls, seed: int, interrupt: bool = False) -> list[torch.Tensor]:
    """A unit with two trainings; ``interrupt`` stops it in the second epoch of the second one."""
    data = TensorDataset(torch.randn(32, 3, generator=torch.Generator().manual_seed(seed)), torch.arange(32) % 2)
    weights = []
    for part in range(2):
        torch.manual_seed(seed + part)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))

        def step(model, batch, part=part):
            calls[part] += 1
            if interrupt and part == 1 and calls[part] == 6:
                raise KeyboardInterrupt
            return nn.functional.cross_entropy(model(batch[0]), batch[1]), {}

        loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
        train.fit(model, loader, step_fn=step, epochs=3, seed=seed, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return weights


def test_an_interrupted_unit_continues_its_trainings_from_their_checkpoints(tmp_path, calls):
    reference = train_two(collections.Counter(), seed=4)
    store = work.WorkCache(tmp_path / "work", CONFIG, resume=True, checkpoint_every_s=0, log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        store("seed", partial(train_two, calls, 4, interrupt=True), seed=4)
    assert not (tmp_path / "work" / "seed" / "seed=4.pt").exists()
    [scratch] = (tmp_path / "work" / "seed").glob("seed=4.*.scratch")
    assert sorted(p.name for p in scratch.iterdir()) == ["fit-0", "fit-1"]
    calls.clear()
    resumed = store("seed", partial(train_two, calls, 4), seed=4)
    assert calls == {1: 8}  # the first training was loaded; the second repeated only its last two epochs
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference, strict=True))
    assert not scratch.exists()  # gone once the unit is stored

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        store("seed", partial(train_two, calls, 5, interrupt=True), seed=5)
    fresh = work.WorkCache(tmp_path / "work", CONFIG, resume=False)
    fresh("seed", partial(train_two, calls, 5), seed=5)
    assert calls == {0: 24, 1: 18}  # not resumed: the interrupted trainings started again from the beginning


@dataclass(frozen=True)
class Toy(NotebookConfig):
    seeds: tuple[int, ...] = (0,)
    lr: float = 0.1
    data_dir: str | None = None


def test_the_session_opens_the_cache_with_resume_and_the_config_without_its_selectors(tmp_path, monkeypatch,
                                                                                     calls):
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(tmp_path))
    params = {"profile": "smoke", "seeds": [0, 1], "lr": 0.5, "data_dir": "/data"}
    session = notebook.start("toy", params, Toy)
    assert session.work.folder == tmp_path / "toy" / "smoke" / "work" and not session.work.resume
    assert session.work.config == {"lr": 0.5}
    session.work("seed", partial(unit, calls, 1), seed=1)
    shard = notebook.start("toy", {**params, "seeds": [1], "resume": True}, Toy)  # other seeds: the same units
    assert shard.work.resume and shard.work.identity == session.work.identity
    shard.work("seed", partial(unit, calls, 1), seed=1)
    assert calls[1] == 1
    walkthrough = notebook.start("toy", {"profile": "smoke", "seeds": [0], "epochs": 2, "data_dir": None})
    assert walkthrough.config is None and walkthrough.work.config == {"epochs": 2}

"""Seeding, determinism and the environment fingerprint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mdbench import environment, repro


def _draw():
    return np.random.rand(), torch.rand(1).item()


def test_same_seed_same_numbers_and_loader_order():
    data = TensorDataset(torch.arange(20))

    def run(seed):
        gen = repro.seed_everything(seed)
        loader = DataLoader(data, batch_size=5, shuffle=True, generator=gen, worker_init_fn=repro.seed_worker)
        return _draw(), [b[0].tolist() for b in loader]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_deterministic_mode_toggles():
    repro.seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    repro.seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_bad_seed_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        repro.seed_everything(seed)


def test_fingerprint_contents():
    fp = repro.fingerprint()
    assert fp["packages"]["torch"] == torch.__version__.split("+")[0] or fp["packages"]["torch"] in torch.__version__
    assert set(fp["git"]) == {"commit", "dirty"}
    assert fp["code"] == environment.code_hash() and len(fp["code"]) == 12
    assert fp["hardware"]["torch_threads"] == torch.get_num_threads()


def test_a_copy_without_git_takes_its_commit_from_the_environment(tmp_path, monkeypatch):
    copy = tmp_path / "project"  # no .git: what a GPU machine is sent
    copy.mkdir()
    environment.git_state.cache_clear()
    try:
        assert environment.git_state(copy) == {"commit": "unknown", "dirty": None}
        environment.git_state.cache_clear()
        monkeypatch.setenv("MDBENCH_GIT_COMMIT", "0123abc")
        monkeypatch.setenv("MDBENCH_GIT_DIRTY", "false")
        assert environment.git_state(copy) == {"commit": "0123abc", "dirty": False}
    finally:
        environment.git_state.cache_clear()


def test_config_hash_is_order_independent():
    assert repro.config_hash({"a": 1, "b": 2}) == repro.config_hash({"b": 2, "a": 1})
    assert repro.config_hash({"a": 1}) != repro.config_hash({"a": 2})

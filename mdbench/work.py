"""Resumable runs: each unit of a notebook's work (one seed, one fold, one row of a table) computed once and kept.

An experiment runs its units through a :class:`Work` callable, which returns what ``compute()`` returns::

    result = work("fold", partial(run_split, bags, features, index, cfg, seed), dataset="pbc", seed=0, fold=3)

:class:`WorkCache` (a notebook's ``session.work``) stores that value atomically in
``<root>/<paper>/<profile>/work/<step>/<key>.pt`` (here ``work/fold/dataset=pbc__seed=0__fold=3.pt``): a JSON header
line saying what made it (the config, a hash of the suite's code, the machine, the time, the payload's length and
SHA-256), then the value as ``torch.save`` writes it. Every run writes its units. A run with ``resume`` loads each
unit stored with the same config and code instead of computing it; records, tables and claims are then built from
the values as from computed ones, so a run interrupted at any point and started again with ``resume`` ends with the
tables of an uninterrupted one (bit for bit on the deterministic profiles). A unit made with another config or code
is computed again; one that cannot be read (cut off in a copy, say) is reported with a warning and computed again.

The config is :meth:`mdbench.params.NotebookConfig.work_config`: the record's config without the parameters that
only pick units (``seeds``, and per paper e.g. ``datasets``), so a unit is also what another machine can run: units of
some seeds (a shard) copied into ``work/`` are loaded by a resumed run with all the seeds as its own.

Inside a unit every :func:`mdbench.train.fit` checkpoints into the unit's scratch folder
(``<key>.<identity>.scratch/``, :func:`mdbench.train.checkpointing`), so a resumed unit continues an interrupted
training from its last checkpoint and loads the trainings it had finished; the folder goes once the unit is stored.

``work/`` is git-ignored and kept after a complete run: its units are what a later ``--resume`` or a merge of shards
reads, and they can be large (per-sample outputs, sometimes models); the committed results are the records. Without
a session, experiments run their units through :func:`uncached`, which stores nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from mdbench import train
from mdbench.environment import code_hash
from mdbench.io import atomic_write
from mdbench.repro import config_hash, fingerprint
from mdbench.results import slug

T = TypeVar("T")
FORMAT = 1
SUFFIX = ".pt"


class Work(Protocol):
    """``work(step, compute, **key)``: the value of ``compute()`` for the unit ``key`` of ``step`` (computed, or
    loaded where :class:`WorkCache` stored it)."""

    def __call__(self, step: str, compute: Callable[[], T], /, **key: Any) -> T: ...


def uncached(step: str, compute: Callable[[], T], /, **key: Any) -> T:
    """A :class:`Work` that computes every unit and stores none: the default of the experiments' ``work``."""
    return compute()


class WorkCacheError(ValueError):
    """A stored unit of work that cannot be read, or a key that cannot name one."""


def unit_name(key: Mapping[str, Any]) -> str:
    """``k1=v1__k2=v2`` (``all`` for no key): the file name of a unit, its key in the order given."""
    for name, value in key.items():
        if not isinstance(value, (str, int, float)):
            raise WorkCacheError(f"work key {name}={value!r}: a key value must be a str, int or float")
    return "__".join(f"{slug(name)}={slug(str(value))}" for name, value in key.items()) or "all"


class WorkCache:
    """The units of work of one notebook run, under ``folder`` (``<root>/<paper>/<profile>/work``).

    Args:
        folder: where the units are stored.
        config: what decides every unit's value besides its key (JSON-serialisable); with the code's hash it makes
            the ``identity`` a stored unit must have to be loaded.
        resume: load the units stored with this identity instead of computing them.
        checkpoint_every_s: how often a ``fit`` inside a unit checkpoints (and when it ends).
        log: where a unit is reported as it is loaded or computed (``print``: the notebook's output, and the live
            log of ``mdbench reproduce``).
    """

    def __init__(self, folder: Path, config: Mapping[str, Any], *, resume: bool = False,
                 checkpoint_every_s: float = 60.0, log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.config = dict(config)
        self.identity = config_hash({"config": self.config, "code": code_hash()})
        self.resume = resume
        self.checkpoint_every_s = checkpoint_every_s
        self.log = log
        self.loaded: list[Path] = []
        self.computed: list[Path] = []
        self._fingerprint: dict[str, Any] | None = None

    def path(self, step: str, key: Mapping[str, Any]) -> Path:
        return self.folder / slug(step) / f"{unit_name(key)}{SUFFIX}"

    def __call__(self, step: str, compute: Callable[[], T], /, **key: Any) -> T:
        path = self.path(step, key)
        if self.resume and path.exists():
            found, value = self._load(path, step, key)
            if found:
                self.loaded.append(path)
                return value
        scratch = path.with_name(f"{path.stem}.{self.identity}.scratch")
        stale = path.parent.glob(f"{path.stem}.{'?' * len(self.identity)}.scratch")
        for other in stale:  # another config's, or this one's when the run is not resumed
            if other != scratch or not self.resume:
                shutil.rmtree(other, ignore_errors=True)
        start = time.perf_counter()
        with train.checkpointing(scratch, self.checkpoint_every_s):
            value = compute()
        seconds = time.perf_counter() - start
        self._store(path, step, key, value, seconds)
        shutil.rmtree(scratch, ignore_errors=True)
        self.computed.append(path)
        self.log(f"work {step} {unit_name(key)}: computed in {seconds:.0f} s")  # progress through a long cell
        return value

    def header(self, path: Path) -> dict[str, Any]:
        """The header of the unit stored at ``path``; :class:`WorkCacheError` if it is not one."""
        try:
            with open(path, "rb") as handle:
                header = json.loads(handle.readline())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WorkCacheError(f"{path} is no stored unit of work: {err}") from err
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise WorkCacheError(f"{path} is no stored unit of work of format {FORMAT}")
        return header

    def _load(self, path: Path, step: str, key: Mapping[str, Any]) -> tuple[bool, Any]:
        """(True, value) of the unit stored at ``path`` if it is whole and was made with this identity for this
        (step, key); (False, None) otherwise, said through ``log`` or, for a damaged file, a warning."""
        described = f"work {step} {unit_name(key)}"
        try:
            header = self.header(path)
            if header["identity"] != self.identity or header["step"] != step or header["key"] != dict(key):
                self.log(f"{described}: stored with another config or code; computing it again")
                return False, None
            payload = path.read_bytes().split(b"\n", 1)[1]
            if len(payload) != header["length"] or hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise WorkCacheError(f"{path}: its value is cut off or altered ({len(payload)} of "
                                     f"{header['length']} bytes, or another SHA-256)")
            # our own file: the values are numbers, frames and models, which weights_only would refuse
            value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - whatever makes a stored unit unreadable means computing it again
            warnings.warn(f"cannot read the stored unit of work {path} ({err}); computing it again", stacklevel=3)
            return False, None
        self.log(f"{described}: loaded (computed {header['time']} in {header['seconds']:.0f} s on "
                 f"{header['machine']})")
        return True, value

    def _store(self, path: Path, step: str, key: Mapping[str, Any], value: Any, seconds: float) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        payload = buffer.getvalue()
        if self._fingerprint is None:
            self._fingerprint = fingerprint()
        hardware = self._fingerprint["hardware"]
        header = {"format": FORMAT, "step": step, "key": dict(key), "identity": self.identity,
                  "config": self.config, "code": code_hash(), "git": self._fingerprint["git"],
                  "machine": hardware["gpu"] or hardware["cpu"], "time": datetime.now(UTC).isoformat(timespec="seconds"),
                  "seconds": seconds, "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        atomic_write(path, json.dumps(header, sort_keys=True, default=str).encode() + b"\n" + payload)

"""EFCM's bags held once on the training device and served in batches, so that a GPU step sees many bags.

A :class:`BagSet` keeps the instances of all its bags as one flat tensor (P, ...) on one device, bag after bag, with
each bag's length and label on the host. Subsets (a fold's training bags), other instances in the same order (the
teacher's features of the patches, a student's), batches of bags zero-padded to their largest bag
(:class:`BagBatch`) and loaders of such batches for :func:`mdbench.train.fit` come from it without copying the
instances back and forth. A loader of one bag per batch draws exactly the bags, in exactly the order, that a
``DataLoader`` over the bags with the same sampler and generator draws (CLAM's one-bag steps).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from mdbench.models.inputs import host_to_device

if TYPE_CHECKING:  # experiment imports this module; Bag is only a type here
    from mdbench.papers.efcm.experiment import Bag

__all__ = ["BagBatch", "BagSet", "row_batches"]


class BagBatch(NamedTuple):
    """B bags zero-padded to the largest: ``instances`` (B, N, ...) and ``labels`` (B,) int64 on the bags' device;
    ``classes`` the same labels and ``lengths`` the bags' sizes as host ints (so that no step waits for the GPU
    to learn them)."""

    instances: torch.Tensor
    labels: torch.Tensor
    classes: tuple[int, ...]
    lengths: tuple[int, ...]


class _Positions(Dataset):
    """Positions 0..n-1 as items, for a DataLoader whose collate builds the batch from the positions."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@dataclass
class BagSet:
    """Bags as one flat tensor of their instances.

    ``instances`` (P, ...) on one device, bag after bag; ``starts`` and ``lengths`` (n,) where each bag's
    instances begin and how many; ``labels`` (n,) the bag labels. Bag ``i`` is
    ``instances[starts[i]:starts[i] + lengths[i]]``.
    """

    instances: torch.Tensor
    starts: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.starts) == len(self.lengths) == len(self.labels) or not len(self.labels):
            raise ValueError(f"a BagSet needs as many starts, lengths and labels, and at least one bag; got "
                             f"{len(self.starts)}, {len(self.lengths)} and {len(self.labels)}")
        if (self.lengths < 1).any() or (self.starts + self.lengths > len(self.instances)).any():
            raise ValueError(f"bags must hold at least one of the {len(self.instances)} instances")

    @classmethod
    def of(cls, bags: Sequence[Bag], device: str | torch.device = "cpu") -> BagSet:
        """The bags ``(instances (N_i, ...), label, ...)`` stacked on ``device``."""
        if not bags:
            raise ValueError("no bags given")
        lengths = np.array([len(b[0]) for b in bags])
        return cls(torch.cat([b[0] for b in bags]).to(device), np.r_[0, np.cumsum(lengths)[:-1]], lengths,
                   np.array([int(b[1]) for b in bags]))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        """Where the instances are."""
        return self.instances.device

    def subset(self, positions: Sequence[int] | np.ndarray) -> BagSet:
        """The bags at ``positions``, in that order, sharing this set's instances (no copy)."""
        positions = np.asarray(positions, dtype=np.int64)
        return BagSet(self.instances, self.starts[positions], self.lengths[positions], self.labels[positions])

    def instance_index(self) -> np.ndarray:
        """(sum of lengths,) positions in ``instances`` of this set's instances, bag after bag."""
        return np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, self.lengths, strict=True)])

    def flat(self) -> torch.Tensor:
        """(sum of lengths, ...) this set's instances, bag after bag (a copy unless the set is all of them)."""
        if len(self.instances) == self.lengths.sum() and (self.starts == np.r_[0, np.cumsum(self.lengths)[:-1]]).all():
            return self.instances
        return self.instances[host_to_device(self.instance_index(), self.device)]

    def with_instances(self, instances: torch.Tensor) -> BagSet:
        """The same bags holding other instances of the same (P,) positions, e.g. features of the patches."""
        if len(instances) != len(self.instances):
            raise ValueError(f"{len(instances)} instances to replace {len(self.instances)}")
        return BagSet(instances, self.starts, self.lengths, self.labels)

    def batch(self, positions: Sequence[int]) -> BagBatch:
        """The bags at ``positions`` (into this set) as a :class:`BagBatch` zero-padded to the largest of them."""
        rows = np.asarray(positions, dtype=np.int64)
        lengths, starts = self.lengths[rows], self.starts[rows]
        width = int(lengths.max())
        offsets = np.arange(width)
        real = offsets[None] < lengths[:, None]  # (B, N)
        index = host_to_device(np.where(real, starts[:, None] + offsets[None], starts[:, None]), self.device)
        instances = self.instances[index]  # (B, N, ...)
        if not real.all():  # zero the padding, so that no bag's instances stand in it
            keep = host_to_device(real, self.device).view(*real.shape, *[1] * (instances.ndim - 2))
            instances = instances * keep
        labels = self.labels[rows]
        return BagBatch(instances, host_to_device(labels, self.device), tuple(int(y) for y in labels),
                        tuple(int(n) for n in lengths))

    def loader(self, batch_size: int = 1, *, weighted: bool = False, shuffle: bool = False,
               generator: torch.Generator | None = None) -> DataLoader:
        """Batches of ``batch_size`` bags (the last may hold fewer) for :func:`mdbench.train.fit`.

        ``weighted``: each epoch draws ``len(self)`` bags with replacement, each class equally likely (CLAM's
        ``--weighted_sample``); else ``shuffle`` or the set's order. The order comes from ``generator`` as a
        ``DataLoader`` over the bags would draw it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sampler = None
        if weighted:
            weights = 1.0 / np.bincount(self.labels)[self.labels]
            # WeightedRandomSampler takes a tensor of weights (it calls torch.as_tensor); its stub says Sequence[float]
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double),  # type: ignore[arg-type]
                                            len(self), generator=generator)
        return DataLoader(_Positions(len(self)), batch_size=batch_size, sampler=sampler,
                          shuffle=shuffle and sampler is None, generator=generator, collate_fn=self.batch)

    def batches(self, batch_size: int) -> Iterator[BagBatch]:
        """The bags in order, ``batch_size`` at a time."""
        for first in range(0, len(self), batch_size):
            yield self.batch(range(first, min(first + batch_size, len(self))))


class _Rows(Dataset):
    """Rows of equally long tensors; an item is a list of row positions (one batch), fetched in one indexing."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        index = host_to_device(np.asarray(rows), self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)


def row_batches(*tensors: torch.Tensor, batch_size: int, generator: torch.Generator, drop_last: bool = False
                ) -> DataLoader:
    """Shuffled batches of rows of ``tensors`` (on any device, each batch one indexing, no per-row collation), in
    the order ``DataLoader(TensorDataset(*tensors), batch_size, shuffle=True, generator=generator)`` draws."""
    if len({len(t) for t in tensors}) != 1:
        raise ValueError(f"tensors of {[len(t) for t in tensors]} rows: all need the same number")
    rows = _Rows(*tensors)
    sampler = BatchSampler(RandomSampler(rows, generator=generator), batch_size, drop_last)
    return DataLoader(rows, batch_size=None, sampler=sampler, generator=generator)

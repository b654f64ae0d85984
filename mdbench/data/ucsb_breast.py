"""UCSB breast cancer MIL (Kandemir et al. 2014): bags of 708-d handcrafted instance features.

Layout: ``<folder>/ucsb_breast_mil.npz`` with ``features`` (N_inst, 708), ``bag_id`` (N_inst,) and
``bag_label`` (N_inst,), one bag per tissue-microarray image, label 0 benign / 1 malignant. No
official split: a seeded stratified 70/15/15 split over bags, or stratified k-fold over bags
(``fold``/``k``), the protocol MIL papers report on this dataset.
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from mdbench.data.base import RealDataset
from mdbench.data.errors import CorruptFileError, LabelError
from mdbench.data.io import require_file
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED, check_split, kfold_splits, split_indices

FILE = "ucsb_breast_mil.npz"
CLASSES = ("benign", "malignant")


def read_bags(path: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(features per bag (n_i, 708) float32, bag labels (B,), bag ids (B,)) with bags sorted by id."""
    require_file(path, "UCSB breast MIL file")
    try:
        with np.load(path) as npz:
            feats, ids, inst_labels = npz["features"], npz["bag_id"], npz["bag_label"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise CorruptFileError(f"cannot read features, bag_id, bag_label from {path}: {err!r}") from err
    if feats.ndim != 2 or not len(feats) == len(ids) == len(inst_labels):
        raise LabelError(f"{path}: features {feats.shape}, bag_id {ids.shape}, bag_label {inst_labels.shape} "
                         "do not describe one row per instance")
    if not np.isin(inst_labels, (0, 1)).all():
        raise LabelError(f"{path}: bag_label has values outside 0..1 ({', '.join(CLASSES)})")
    order = np.argsort(ids, kind="stable")
    bag_ids, starts = np.unique(ids[order], return_index=True)
    groups = np.split(order, starts[1:])
    labels = []
    for bag, rows in zip(bag_ids, groups, strict=True):
        values = np.unique(inst_labels[rows])
        if len(values) != 1:
            raise LabelError(f"{path}: bag {bag} has instances with different bag_label values "
                             f"{values.tolist()}")
        labels.append(int(values[0]))
    return [feats[rows].astype(np.float32) for rows in groups], np.asarray(labels), bag_ids


class UCSBBreastDataset(RealDataset):
    """Bags as ``(FloatTensor (n_i, 708), label int)``; ``bag_ids`` holds this split's bag ids in order.

    Args:
        folder: the ``ucsb_breast`` folder.
        split: "train", "val", "test" or "all"; with ``fold``, "train" or "test".
        fold, k: take fold ``fold`` of a seeded stratified ``k``-fold over bags as the test set.
        standardize: z-score each feature with the mean/std of the training instances of the same
            split (same seed, fractions/fold), so no test statistics leak into training.
        seed, fractions: the seeded stratified split.
        transform: applied to the feature tensor.
    """

    name = "ucsb_breast"
    classes = CLASSES

    def __init__(self, folder: Path | str, split: str = "train", fold: int | None = None, k: int = 5,
                 standardize: bool = False, seed: int = DEFAULT_SEED,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        super().__init__(folder, split, seed, fractions, transform)
        self.fold = fold
        self.npz_path = self.folder / FILE
        self.bags, self.labels, self.all_bag_ids = read_bags(self.npz_path)
        if fold is None:
            parts = split_indices(len(self.bags), self.labels, self.fractions, seed)
            train = parts["train"]
            self.indices = np.arange(len(self.bags)) if split == "all" else parts[split]
        else:
            check_split(split, ("train", "test"))
            if not 0 <= fold < k:
                raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
            train, test = kfold_splits(self.labels, k, seed)[fold]
            self.indices = train if split == "train" else test
        self.scaler = None
        if standardize:
            self.scaler = StandardScaler().fit(np.concatenate([self.bags[b] for b in train]))

    @property
    def bag_ids(self) -> np.ndarray:
        """Bag ids of this split, in item order."""
        return self.all_bag_ids[self.indices]

    def source_files(self) -> list[Path]:
        return [self.npz_path]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        bag = int(self.indices[i])
        x = self.bags[bag] if self.scaler is None else self.scaler.transform(self.bags[bag])
        return self._apply(torch.from_numpy(x.astype(np.float32))), int(self.labels[bag])

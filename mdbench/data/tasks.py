"""Paper task builders on the real datasets: MIL bags (ISIC tiles, PBC cell sets).

- :func:`isic_image_bags`: every ISIC 2017 image is a bag of grid tiles; positive = melanoma.
- :func:`pbc_cell_set_bags`: bags are sets of PBC blood-cell images; positive = holds an erythroblast.

Every builder draws from one split of the underlying loader, so train and test never share an image; PBC cell
sets drawn with ``disjoint=True`` share no image at all, so that any split of the bags keeps images apart.
Data card: ``data_cards/synthetic_mil.md`` (bag definitions). The real datasets become box-prompt cases in
:func:`mdbench.papers.daft.cases.write_real_cases`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from mdbench.data.mil import balanced_bag_labels, draw_instance_labels, tile_fractions, tile_image
from mdbench.data.registry import load_dataset
from mdbench.data.synthetic import params_checksum

# Classes seen in the peripheral blood of healthy adults. Erythroblasts (nucleated red cells) should
# be absent there, which makes "contains an erythroblast" a clean bag-level finding; immature
# granulocytes are left out of both pools because a few are normal, so they would blur the bag label.
NORMAL_PBC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "platelet")


class LabelledSplit(Protocol):
    """What the builders read from a split of a real loader (:class:`mdbench.data.base.RealDataset` with ``labels``,
    as the PBC and ISIC 2017 loaders): items by position, the class of every case, this split's cases."""

    @property
    def classes(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Sequence[int] | np.ndarray: ...  # label of every case of the dataset (all splits)

    @property
    def indices(self) -> np.ndarray: ...  # this split's cases

    @property
    def split(self) -> str: ...

    @property
    def checksum(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def _split_labels(dataset: LabelledSplit) -> np.ndarray:
    """Label of every item of a real loader's split, read from its index without decoding images."""
    return np.asarray(dataset.labels)[dataset.indices]


# ----------------------------------------------------------------------------- ISIC tile bags
class ISICImageBags(Dataset):
    """ISIC 2017 images as MIL bags of tiles.

    Args:
        segmentation: an ISIC 2017 segmentation split (items ``{"image", "mask", "id"}``) whose
            images the tiles cover exactly, with ``labels`` / ``indices`` / ``classes`` as in
            :class:`mdbench.data.isic2017.ISIC2017Dataset`.
        tile: tile side in pixels (a 256-pixel image gives a 4x4 grid of 64-pixel tiles).
        stride: pixels between tiles (default ``tile``: non-overlapping); a 256-pixel image gives 3x3
            128-pixel tiles at stride 64, each overlapping its neighbours by half.
        lesion_fraction: a tile of a positive bag is a key instance when at least this share of its
            pixels is lesion.
        positive_class: the diagnosis that makes a bag positive.

    Items: ``(tiles FloatTensor (n, 3, tile, tile), bag_label int, instance_labels LongTensor (n,))``,
    tiles row-major. Instance labels are a proxy: "lesion tile of a melanoma image", not a
    pathologist's tile annotation. Negative bags have no key instance (their lesion is benign); a
    positive bag whose lesion reaches ``lesion_fraction`` in no tile marks its most-lesion tile.
    """

    classes = ("negative", "positive")

    def __init__(
        self,
        segmentation: LabelledSplit,
        tile: int = 64,
        lesion_fraction: float = 0.5,
        positive_class: str = "melanoma",
        stride: int | None = None,
    ) -> None:
        if not 0 < lesion_fraction <= 1:
            raise ValueError(f"lesion_fraction must lie in (0, 1], got {lesion_fraction}")
        if positive_class not in segmentation.classes:
            raise ValueError(f"positive_class {positive_class!r} is not one of {segmentation.classes}")
        self.segmentation, self.tile, self.stride, self.lesion_fraction = segmentation, tile, stride, lesion_fraction
        self.split = segmentation.split
        self.bag_labels = (_split_labels(segmentation) == segmentation.classes.index(positive_class)).astype(np.int64)
        params = {"data": segmentation.checksum, "split": self.split, "tile": tile}
        params.update(lesion_fraction=lesion_fraction, positive_class=positive_class)
        if stride not in (None, tile):  # non-overlapping tiles keep the checksum they always had
            params["stride"] = stride
        self.checksum = params_checksum("ISICImageBags", params, 0)

    def __len__(self) -> int:
        return len(self.segmentation)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        item = self.segmentation[index]
        bag_label = int(self.bag_labels[index])
        fractions = tile_fractions(item["mask"], self.tile, self.stride)
        instance_labels = (fractions >= self.lesion_fraction).long() * bag_label
        if bag_label and not instance_labels.any() and fractions.max() > 0:
            instance_labels[fractions.argmax()] = 1
        return tile_image(item["image"], self.tile, self.stride), bag_label, instance_labels


def isic_image_bags(
    split: str = "train",
    grid: int = 4,
    tile: int = 64,
    lesion_fraction: float = 0.5,
    data_dir: str | os.PathLike | None = None,
    stride: int | None = None,
) -> ISICImageBags:
    """ISIC 2017 ``split`` as bags of ``grid x grid`` tiles of ``tile`` pixels every ``stride`` pixels (default
    ``tile``), from images resized to ``(grid - 1) * stride + tile`` pixels (``grid * tile`` without overlap).

    Cases with an empty lesion mask are skipped (the loader logs how many). See :class:`ISICImageBags`.
    """
    # load_dataset is typed for any loader; the ISIC 2017 one has labels, indices, classes, split and checksum
    segmentation = cast(LabelledSplit, load_dataset(
        "isic2017", split=split, data_dir=data_dir, task="segmentation", image_size=(grid - 1) * (stride or tile) + tile,
        foreground_only=True,
    ))
    return ISICImageBags(segmentation, tile, lesion_fraction, stride=stride)


# ----------------------------------------------------------------------------- PBC cell-set bags
class CellSetBags(Dataset):
    """Bags that are sets of classified images; positive iff the set holds ``key_class`` images.

    Args:
        images: a classification split (items ``(image (C,h,w), label)``) with ``labels`` /
            ``indices`` / ``classes`` / ``checksum`` / ``split`` as the real loaders have.
        n_bags: number of bags (``round(n_bags * positive_fraction)`` positive).
        bag_size, n_key: inclusive ``(min, max)`` instances per bag and key instances per positive bag.
        key_class: the class whose presence makes a bag positive.
        negative_classes: classes the other instances come from.
        positive_fraction: share of positive bags.
        seed: seed of the bag draw.
        disjoint: no image in two bags. The bags are then independent cases that any split of the bags
            (e.g. k-fold cross-validation) keeps apart, and there are at most as many as the images fill:
            the draw stops at the first bag the unused images cannot fill (``len(bags)`` may fall short of
            ``n_bags``; the shared PBC subset's 120 erythroblasts fill about 60 positive bags).

    No image appears twice in a bag. Without ``disjoint``, different bags of one split may share images
    (a split of PBC is too small to give every bag its own); bags of different splits never do.

    Items: ``(instances FloatTensor (n, C, h, w), bag_label int, instance_labels LongTensor (n,))``.
    """

    classes = ("negative", "positive")

    def __init__(
        self,
        images: LabelledSplit,
        n_bags: int,
        bag_size: tuple[int, int] = (8, 16),
        n_key: tuple[int, int] = (1, 3),
        key_class: str = "erythroblast",
        negative_classes: Sequence[str] = NORMAL_PBC_CLASSES,
        positive_fraction: float = 0.5,
        seed: int = 0,
        disjoint: bool = False,
    ) -> None:
        unknown = sorted({key_class, *negative_classes} - set(images.classes))
        if unknown or key_class in negative_classes:
            raise ValueError(
                f"key_class {key_class!r} and negative_classes {list(negative_classes)} must be distinct "
                f"classes of {images.classes}; unknown: {unknown}"
            )
        labels = _split_labels(images)
        key_pool = np.flatnonzero(labels == images.classes.index(key_class))
        negative_pool = np.flatnonzero(np.isin(labels, [images.classes.index(c) for c in negative_classes]))
        if len(key_pool) < n_key[1] or len(negative_pool) < bag_size[1]:
            raise ValueError(
                f"split {images.split!r} has {len(key_pool)} {key_class} and {len(negative_pool)} negative images; "
                f"need at least n_key max {n_key[1]} and bag_size max {bag_size[1]}"
            )
        self.images, self.split = images, images.split
        rng = np.random.default_rng(seed)
        self.bag_labels = balanced_bag_labels(rng, n_bags, positive_fraction)
        self.bags: list[tuple[np.ndarray, np.ndarray]] = []  # (item indices, instance labels) per bag
        unused = {1: rng.permutation(key_pool), 0: rng.permutation(negative_pool)} if disjoint else {}
        for bag_label in self.bag_labels:
            instance_labels = draw_instance_labels(rng, int(bag_label), bag_size, n_key)
            counts = {label: int((instance_labels == label).sum()) for label in (1, 0)}
            if disjoint and any(counts[label] > len(unused[label]) for label in counts):
                break  # the unused images cannot fill this bag
            items = np.empty(len(instance_labels), dtype=np.int64)
            for label, pool in ((1, key_pool), (0, negative_pool)):
                if disjoint:
                    items[instance_labels == label] = unused[label][: counts[label]]
                    unused[label] = unused[label][counts[label]:]
                else:
                    items[instance_labels == label] = rng.choice(pool, counts[label], replace=False)
            self.bags.append((items, instance_labels))
        self.bag_labels = self.bag_labels[: len(self.bags)]
        params = {"data": images.checksum, "split": self.split, "n_bags": n_bags, "bag_size": list(bag_size)}
        params.update(n_key=list(n_key), key_class=key_class, negative_classes=list(negative_classes))
        params.update(positive_fraction=positive_fraction, **({"disjoint": True} if disjoint else {}))
        self.checksum = params_checksum("CellSetBags", params, seed)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        items, instance_labels = self.bags[index]
        instances = torch.stack([self.images[int(i)][0] for i in items])
        return instances, int(self.bag_labels[index]), torch.from_numpy(instance_labels)


def pbc_cell_set_bags(
    split: str = "train",
    n_bags: int = 100,
    bag_size: tuple[int, int] = (8, 16),
    n_key: tuple[int, int] = (1, 3),
    key_class: str = "erythroblast",
    negative_classes: Sequence[str] = NORMAL_PBC_CLASSES,
    positive_fraction: float = 0.5,
    image_size: int = 64,
    channels: int = 3,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    disjoint: bool = False,
) -> CellSetBags:
    """Bags of PBC cell images from ``split`` (resized to ``image_size``); see :class:`CellSetBags`."""
    # load_dataset is typed for any loader; the PBC one has labels, indices, classes, split and checksum
    images = cast(LabelledSplit, load_dataset("pbc", split=split, data_dir=data_dir, image_size=image_size,
                                              channels=channels))
    return CellSetBags(images, n_bags, bag_size, n_key, key_class, negative_classes, positive_fraction, seed,
                       disjoint)

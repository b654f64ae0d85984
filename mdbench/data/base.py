"""Scaffolding shared by the real-dataset loaders: split bookkeeping, lazy checksum, image/mask items."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

from mdbench.data.checksums import tree_checksum
from mdbench.data.io import check_same_size, image_tensor, mask_tensor, read_binary_mask, read_image, require_dir
from mdbench.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED, check_split, split_indices

log = logging.getLogger(__name__)


class RealDataset(Dataset):
    """Base of every real-dataset loader.

    Attributes:
        folder: the dataset's folder (``<data root>/<registry folder>``).
        split: "train", "val", "test" or "all".
        indices: positions of this split's cases in the dataset's full, name-sorted case list.
        classes: class names; a label ``k`` means ``classes[k]``.
        checksum: :func:`tree_checksum` of every file the loader indexed (all splits, so train/val/test
            share it: it names the data, while (split, seed, fractions) name the cut). Computed on first use.
    """

    name: ClassVar[str]
    classes: tuple[str, ...]

    def __init__(self, folder: Path | str, split: str = "train", seed: int = DEFAULT_SEED,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 transform: Callable[[Any], Any] | None = None) -> None:
        self.folder = require_dir(Path(folder), f"{self.name} folder")
        self.split = check_split(split)
        self.seed = seed
        self.fractions = tuple(fractions)
        self.transform = transform
        self.indices = np.zeros(0, dtype=np.int64)

    def _select(self, n: int, labels: Sequence[int] | np.ndarray | None = None) -> None:
        """Set ``self.indices`` to this split's cases out of ``n`` (stratified by ``labels`` if given)."""
        if self.split == "all":
            self.indices = np.arange(n)
        else:
            self.indices = split_indices(n, labels, self.fractions, self.seed)[self.split]

    def source_files(self) -> list[Path]:
        """Every file this loader indexed, for :attr:`checksum`."""
        raise NotImplementedError

    @cached_property
    def checksum(self) -> str:
        return tree_checksum(self.source_files(), root=self.folder)

    def _apply(self, item: Any) -> Any:
        return item if self.transform is None else self.transform(item)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, folder={str(self.folder)!r})"


class ImageMaskDataset(RealDataset):
    """Binary 2D segmentation pairs; subclasses fill ``ids``, ``image_paths`` and ``mask_paths`` (all cases).

    Items: ``{"image": FloatTensor (3, H, W) in [0, 1], "mask": LongTensor (H, W) in {0, 1}, "id": str}``
    plus whatever :meth:`_extras` adds; H = W = ``image_size`` when it is set, else the file's own size.
    """

    ids: list[str]
    image_paths: list[Path]
    mask_paths: list[Path]
    image_size: int | None = None

    def _read_mask(self, case: int) -> np.ndarray:
        """Bool mask (H, W) of case ``case`` at file resolution; HC18 overrides it to fill outlines."""
        return read_binary_mask(self.mask_paths[case])

    def _extras(self, case: int, image_hw: tuple[int, int]) -> dict[str, Any]:
        """Extra item fields, given the image's file (H, W)."""
        return {}

    def has_foreground(self, i: int) -> bool:
        """Whether item ``i`` of this split has any foreground pixel (after resizing, as returned)."""
        return bool(mask_tensor(self._read_mask(self.indices[i]), self.image_size).any())

    def _keep_foreground(self) -> None:
        """Drop cases whose mask is empty (box-prompt pipelines need a box), logging how many."""
        keep = [self.has_foreground(i) for i in range(len(self))]
        dropped = len(keep) - sum(keep)
        if dropped:
            log.info("%s %s: skipped %d of %d cases with an empty mask",
                     self.name, self.split, dropped, len(keep))
        self.indices = self.indices[np.asarray(keep, dtype=bool)]

    def _segmentation_item(self, case: int) -> dict[str, Any]:
        image = read_image(self.image_paths[case], "RGB")
        mask = self._read_mask(case)
        check_same_size(image, mask, self.mask_paths[case])
        item = {"image": image_tensor(image, self.image_size), "mask": mask_tensor(mask, self.image_size),
                "id": self.ids[case]}
        item.update(self._extras(case, (image.height, image.width)))
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._apply(self._segmentation_item(int(self.indices[i])))

    @property
    def files(self) -> list[Path]:
        """Image files of this split, in item order."""
        return [self.image_paths[c] for c in self.indices]

    def source_files(self) -> list[Path]:
        return self.image_paths + self.mask_paths


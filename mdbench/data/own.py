"""Your own datasets, registered by name so that a paper's notebook runs on them (``-p dataset NAME``).

``mdbench data register NAME PATH --layout classfolders|decathlon`` checks the folder with the layout's loader
(:class:`mdbench.data.classfolders.ClassFolderDataset`: one sub-folder of images per class;
:class:`mdbench.data.decathlon.DecathlonDataset`: ``dataset.json`` with imagesTr/labelsTr NIfTI pairs) and stores
``NAME: {path, layout, classes}`` in ``<config>/datasets.yaml``, where ``<config>`` is ``MDBENCH_CONFIG_DIR`` if
set, else ``~/.config/mdbench``. :func:`mdbench.data.registry.load_dataset` then reads ``NAME`` from that folder
(no data root needed). Only yaml is imported here, so that ``mdbench data list`` stays fast.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mdbench.data.errors import DataError, DataNotFoundError
from mdbench.io import atomic_write

CONFIG_ENV = "MDBENCH_CONFIG_DIR"
FILE_NAME = "datasets.yaml"
# layout -> (loader "<module under mdbench.data>:<class>", task as the registry names it)
LAYOUTS = {"classfolders": ("classfolders:ClassFolderDataset", "classification"),
           "decathlon": ("decathlon:DecathlonDataset", "segmentation-3d")}
# names the notebooks give another meaning to
RESERVED = ("synthetic", "real", "none")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class RegistrationError(DataError, ValueError):
    """A name, folder or layout that cannot be registered, or a datasets.yaml that cannot be read."""


@dataclass(frozen=True)
class OwnDataset:
    """One registered dataset: its absolute folder, layout (a key of :data:`LAYOUTS`) and class names in label
    order (as the loader read them at registration)."""

    name: str
    path: str
    layout: str
    classes: tuple[str, ...]

    @property
    def loader_name(self) -> str:
        return LAYOUTS[self.layout][0]

    @property
    def task(self) -> str:
        return LAYOUTS[self.layout][1]


def config_dir() -> Path:
    """``MDBENCH_CONFIG_DIR`` if set, else ``~/.config/mdbench``."""
    return Path(os.environ.get(CONFIG_ENV) or Path.home() / ".config" / "mdbench").expanduser()


def datasets_file() -> Path:
    """The file that holds the registered datasets."""
    return config_dir() / FILE_NAME


def registered() -> dict[str, OwnDataset]:
    """The registered datasets by name (none where the file does not exist)."""
    path = datasets_file()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return {name: OwnDataset(name=name, path=str(entry["path"]), layout=_layout(entry["layout"]),
                                 classes=tuple(str(c) for c in entry["classes"])) for name, entry in data.items()}
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as err:
        raise RegistrationError(f"{path} is not a datasets file of mdbench ({{name: {{path, layout, classes}}}}): "
                                f"{err!r}; fix or delete it and register the datasets again") from err


def _layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise RegistrationError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return layout


def open_dataset(layout: str, folder: Path, **kwargs: Any) -> Any:
    """The layout's loader on ``folder`` (``kwargs``: split and the loader's options)."""
    module, cls = LAYOUTS[_layout(layout)][0].split(":")
    return getattr(importlib.import_module(f"mdbench.data.{module}"), cls)(folder, **kwargs)


def register(name: str, path: str | os.PathLike, layout: str) -> OwnDataset:
    """Check ``path`` with the ``layout``'s loader (every file indexed, the first item read) and store it as
    ``name`` (replacing an earlier registration of that name); returns the entry. Raises
    :class:`RegistrationError` for a bad name or layout, :class:`~mdbench.data.errors.DataNotFoundError` for a
    missing folder, and the loader's :class:`~mdbench.data.errors.DataError` for data it cannot read."""
    from mdbench.data.registry import DATASETS  # the built-in names (registry imports this module)

    if not _NAME.match(name) or name in RESERVED or name in DATASETS:
        raise RegistrationError(f"cannot register {name!r}: a dataset name is 1-40 lower-case letters, digits or _ "
                                f"starting with a letter, and none of the built-in ones "
                                f"({', '.join([*RESERVED, *DATASETS])})")
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir():
        raise DataNotFoundError(f"cannot register {name!r}: {folder} is not a folder")
    dataset = open_dataset(layout, folder, split="all")
    _ = dataset[0]  # a file the loader cannot decode is refused now, not in the middle of a notebook
    entry = OwnDataset(name=name, path=str(folder), layout=layout, classes=tuple(dataset.classes))
    entries = {**registered(), name: entry}
    atomic_write(datasets_file(), yaml.safe_dump({n: {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in asdict(e).items() if k != "name"}
                                                  for n, e in sorted(entries.items())}, sort_keys=False))
    return entry

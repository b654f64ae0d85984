"""Your own dataset: class folders and Decathlon folders registered by name, read by the registry and the notebooks,
bad input refused with errors that say what to fix."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from mdbench import cli
from mdbench.data import own
from mdbench.data.checksums import verification_state
from mdbench.data.classfolders import ClassFolderDataset
from mdbench.data.errors import DataNotFoundError, LabelError, UnknownDatasetError, UnverifiedDataWarning
from mdbench.data.registry import get_spec, is_present, load_dataset
from mdbench.papers.med_tuning import experiment as med_tuning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path, monkeypatch, fresh_data_verification):
    """Registrations of one test in a folder of its own; what it reads unverified is forgotten after it."""
    monkeypatch.setenv(own.CONFIG_ENV, str(tmp_path / "config"))


def class_folders(root: Path, per_class: int = 10, classes=("cat", "ant"), size: int = 12) -> Path:
    """PNG images in ``root/<class>/``; class k's images are uniform grey 40 + 150·k (plus noise)."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(40 + 150 * k + rng.normal(0, 5, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def decathlon(root: Path, labels=("background", "Anterior", "Posterior"), n: int = 4, shape=(6, 7, 8)) -> Path:
    """``root/dataset.json`` and ``n`` imagesTr/labelsTr NIfTI pairs, label k a box of value k."""
    rng = np.random.default_rng(0)
    training = []
    for case in range(n):
        name = f"case_{case:03d}.nii.gz"
        for sub, data in (("imagesTr", rng.normal(100, 20, shape).astype(np.float32)),
                          ("labelsTr", _label(shape, len(labels)))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), root / sub / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "mine", "labels": {str(k): v for k, v in enumerate(labels)}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _label(shape, n_labels: int) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for k in range(1, n_labels):
        label[k:k + 1, 1:3, 1:3] = k
    return label


def test_class_folders_register_and_load_by_name(tmp_path, capsys):
    folder = class_folders(tmp_path / "pets")
    (folder / "README.txt").write_text("beside the class folders: ignored")
    (folder / "cat" / ".DS_Store").write_bytes(b"hidden: ignored")
    assert cli.main(["data", "register", "pets", str(folder), "--layout", "classfolders"]) == 0
    assert "registered 'pets': classfolders" in capsys.readouterr().out
    stored = yaml.safe_load((tmp_path / "config" / "datasets.yaml").read_text())
    assert stored == {"pets": {"path": str(folder), "layout": "classfolders", "classes": ["ant", "cat"]}}

    spec = get_spec("pets")
    assert spec.classes == ("ant", "cat") and spec.task == "classification" and is_present("pets")
    with pytest.warns(UnverifiedDataWarning, match="registered without a SHA256SUMS"):  # recorded in fingerprints
        parts = {s: load_dataset("pets", split=s, image_size=8, channels=3) for s in ("train", "val", "test")}
    assert verification_state() != "sha256"
    indices = np.concatenate([p.indices for p in parts.values()])
    assert sorted(indices) == list(range(20))  # the splits partition the 20 images
    assert {int(parts["test"].labels[i]) for i in parts["test"].indices} == {0, 1}  # stratified
    image, label = parts["train"][0]
    assert image.shape == (3, 8, 8) and 0 <= float(image.min()) <= float(image.max()) <= 1
    # label k is the k-th class in sorted order: ant (written second, grey 190) is 0, cat (grey 40) is 1
    assert label == ("ant", "cat").index(parts["train"].files[0].parent.name)
    assert (float(image.mean()) > 0.5) == (label == 0)
    assert parts["train"].checksum == parts["test"].checksum == load_dataset("pets", split="all").checksum
    assert load_dataset("pets", split="all", channels=1)[0][0].shape == (1, 12, 12)

    assert cli.main(["data", "list"]) == 0
    assert any(line.split()[:3] == ["pets", "yes", "classification"] for line in capsys.readouterr().out.splitlines())


def test_decathlon_registers_and_med_tuning_takes_only_hippocampus_labels(tmp_path):
    hippo = decathlon(tmp_path / "hippo")
    entry = own.register("hippo", hippo, "decathlon")
    assert entry.classes == ("background", "anterior", "posterior")
    with pytest.warns(UnverifiedDataWarning):
        item = load_dataset("hippo", split="all", spatial_size=(4, 4, 4))[0]
    assert item["image"].shape == (1, 4, 4, 4) and item["label"].shape == (4, 4, 4)
    assert set(load_dataset("hippo", split="all")[1]["label"].unique().tolist()) == {0, 1, 2}
    med_tuning.check_classes("hippo")  # the notebook's label set: accepted
    med_tuning.check_classes("msd_hippocampus")

    decathlon(tmp_path / "liver", labels=("background", "liver"))
    own.register("liver", tmp_path / "liver", "decathlon")
    assert set(own.registered()) == {"hippo", "liver"}
    with pytest.raises(ValueError, match=r"'liver' has the labels \['background', 'liver'\].*anterior.*posterior"):
        med_tuning.check_classes("liver")


def test_msd_hippocampus_is_read_by_the_decathlon_loader(real_data_dir):
    from mdbench.data.decathlon import DecathlonDataset

    ds = load_dataset("msd_hippocampus", "test", data_dir=real_data_dir)
    assert isinstance(ds, DecathlonDataset) and len(ds) == 20
    # the checksum and split of main before the loader moved into mdbench/data/decathlon.py
    assert ds.checksum == "4d3904c22a754e73d98c4de0de1dc26a67553ecd1eb034afad2fe60c0f64f547"
    assert ds.indices[:5].tolist() == [2, 7, 8, 10, 22]


@pytest.mark.slow
def test_the_quickstart_notebook_runs_on_a_registered_dataset(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    own.register("pets", class_folders(tmp_path / "pets", per_class=20), "classfolders")
    monkeypatch.setenv("MDBENCH_RESULTS_DIR", str(tmp_path / "results"))
    out = tmp_path / "quickstart.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "00_quickstart.ipynb"), str(out), kernel_name="python3",
                               cwd=str(REPO / "notebooks"), progress_bar=False,
                               parameters={"dataset": "pets", "seeds": [0], "epochs": 2})
    executed = nbformat.read(out, as_version=4)
    assert "pets" in json.dumps([c.get("outputs", []) for c in executed.cells])
    records = list((tmp_path / "results" / "quickstart" / "smoke" / "records").glob("table1__pets__*.json"))
    assert len(records) == 4  # (untrained, trained) x (accuracy, auc) on the registered dataset


def test_bad_own_datasets_are_refused_with_what_to_fix(tmp_path, capsys):
    def refused(path: Path, layout: str = "classfolders", name: str = "mine") -> str:
        assert cli.main(["data", "register", name, str(path), "--layout", layout]) == 2
        return capsys.readouterr().err

    one_class = tmp_path / "one"
    class_folders(one_class, classes=("cat",))
    assert "1 class folder(s) (cat)" in refused(one_class) and "at least two" in refused(one_class)
    empty = class_folders(tmp_path / "empty")
    (empty / "dog").mkdir()
    assert f"class folder {empty / 'dog'} holds no image" in refused(empty)
    stray = class_folders(tmp_path / "stray")
    (stray / "cat" / "notes.txt").write_text("not an image")
    assert "are not images" in refused(stray) and "cat/notes.txt" in refused(stray)
    broken = class_folders(tmp_path / "broken", per_class=1)
    (broken / "ant" / "000.png").write_bytes(b"not a png")
    assert "cannot decode image" in refused(broken)
    assert "is not a folder" in refused(tmp_path / "missing")
    good = class_folders(tmp_path / "good")
    assert "none of the built-in ones" in refused(good, name="pbc")
    assert "none of the built-in ones" in refused(good, name="synthetic")
    assert "none of the built-in ones" in refused(good, name="My Data")
    with pytest.raises(SystemExit):
        cli.main(["data", "register", "mine", str(good), "--layout", "imagenet"])

    assert "dataset.json" in refused(class_folders(tmp_path / "not_decathlon"), "decathlon")
    out_of_range = decathlon(tmp_path / "range", labels=("background", "a", "b"))
    label = np.zeros((6, 7, 8), np.uint8)
    label[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(label, np.eye(4)), out_of_range / "labelsTr" / "case_000.nii.gz")
    assert "values [5] outside 0..2" in refused(out_of_range, "decathlon")
    four_d = decathlon(tmp_path / "4d")
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 2), np.float32), np.eye(4)), four_d / "imagesTr" / "case_000.nii.gz")
    assert "expected a 3D volume" in refused(four_d, "decathlon")
    assert not (tmp_path / "config" / "datasets.yaml").exists()  # nothing refused was registered

    with pytest.raises(UnknownDatasetError, match="register your own with `mdbench data register"):
        get_spec("mine")
    own.register("gone", good, "classfolders")
    for path in sorted(good.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    good.rmdir()
    with pytest.raises(DataNotFoundError, match="registered at .* register it again"):
        load_dataset("gone")
    (tmp_path / "config" / "datasets.yaml").write_text("gone: [not, a, mapping]\n")
    with pytest.raises(own.RegistrationError, match="not a datasets file"):
        own.registered()


def test_class_folder_loader_alone(tmp_path):
    folder = class_folders(tmp_path / "pets", per_class=3, classes=("b", "a", "c"))
    ds = ClassFolderDataset(folder, "all")
    assert ds.classes == ("a", "b", "c") and len(ds) == 9 and ds.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    with pytest.raises(LabelError):
        ClassFolderDataset(tmp_path, "all")  # holds one folder: pets

"""Synthetic generators: determinism, shapes and ranges, learnability, MIL consistency, box-prompt cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

from mdbench.data.boxprompt import modality_of, read_boxprompt_case
from mdbench.data.mil import collate_bags
from mdbench.data.synthetic import (
    SYNTHETIC_BOXPROMPT_KINDS,
    SyntheticBoxPromptCases,
    SyntheticClassification,
    SyntheticMILBags,
    SyntheticVolumes,
    write_synthetic_boxprompt_cases,
)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


# ----------------------------------------------------------------------------- classification
def test_classification_is_deterministic_per_seed_and_split():
    a, b = SyntheticClassification(6, seed=3), SyntheticClassification(6, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(6))
    assert a.checksum == b.checksum
    other_seed, other_split = SyntheticClassification(6, seed=4), SyntheticClassification(6, seed=3, split="test")
    assert not torch.equal(a[0][0], other_seed[0][0]) and a.checksum != other_seed.checksum
    assert not torch.equal(a[0][0], other_split[0][0]) and a.checksum != other_split.checksum


def test_classification_shapes_ranges_and_balance():
    data = SyntheticClassification(10, num_classes=5, image_size=24, channels=1, seed=0)
    images, labels = _stack(data)
    assert images.shape == (10, 1, 24, 24) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.bincount(labels, minlength=5).tolist() == [2] * 5
    assert len(data.classes) == 5
    with pytest.raises(IndexError):
        data[10]


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"split": "dev"}, {"num_classes": 1}, {"image_size": 4}])
def test_classification_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticClassification(4, **kwargs)


def test_classification_learnable_by_tiny_cnn_and_chance_untrained():
    torch.manual_seed(0)
    x, y = _stack(SyntheticClassification(256, num_classes=4, image_size=24, seed=0, split="train"))
    xt, yt = _stack(SyntheticClassification(128, num_classes=4, image_size=24, seed=0, split="test"))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 4),
    )

    def accuracy() -> float:
        with torch.no_grad():
            return (net(xt).argmax(1) == yt).float().mean().item()

    untrained = accuracy()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(15):  # about 3 s on one CPU thread
        for batch in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert untrained < 0.45  # chance is 0.25
    assert accuracy() > 0.8


# ----------------------------------------------------------------------------- volumes
def test_volumes_are_hippocampus_like():
    data = SyntheticVolumes(2, shape=(20, 32, 20), seed=1, normalize="minmax")
    item = data[0]
    assert item["image"].shape == (1, 20, 32, 20) and item["image"].dtype == torch.float32
    assert item["image"].min() == 0 and item["image"].max() == 1
    label = item["label"].numpy()
    assert item["label"].dtype == torch.int64 and set(np.unique(label)) == {0, 1, 2}
    assert item["spacing"] == (1.0, 1.0, 1.0) and data.classes == ("background", "anterior", "posterior")
    # anterior (1) lies at larger H than posterior (2), and the two segments touch
    h = np.indices(label.shape)[1]
    assert h[label == 1].mean() > h[label == 2].mean()
    assert (ndimage.binary_dilation(label == 1) & (label == 2)).any()
    # the structure is brighter than the background, so it is learnable from the image
    image = item["image"][0].numpy()
    assert image[label > 0].mean() > image[label == 0].mean() + 0.2
    zscored = SyntheticVolumes(2, shape=(20, 32, 20), seed=1)[0]
    assert torch.equal(zscored["label"], item["label"])
    assert abs(float(zscored["image"].mean())) < 1e-4 and abs(float(zscored["image"].std()) - 1) < 1e-3
    assert not torch.equal(data[1]["label"], item["label"])


def test_volumes_more_classes():
    label = SyntheticVolumes(1, shape=(24, 48, 24), num_classes=5, seed=0)[0]["label"]
    assert set(torch.unique(label).tolist()) == {0, 1, 2, 3, 4}


# ----------------------------------------------------------------------------- box-prompt cases
def _check_case(case: dict, three_d: bool) -> None:
    imgs, gts, boxes = case["imgs"], case["gts"], case["boxes"]
    assert imgs.dtype == np.uint8 and gts.dtype == np.uint8
    assert imgs.shape == (gts.shape if three_d else gts.shape + (3,))
    k = int(gts.max())
    assert k >= 1 and sorted(np.unique(gts)) == list(range(k + 1))  # consecutive instance ids
    assert boxes.shape == (k, 6 if three_d else 4)
    d = gts.ndim
    for label, box in enumerate(boxes, start=1):
        coords = np.argwhere(gts == label)[:, ::-1]  # (x, y[, z]) like the boxes
        np.testing.assert_array_equal(box[:d], coords.min(0))  # tight and containing the mask
        np.testing.assert_array_equal(box[d:], coords.max(0))
    assert (boxes[:, d:] < np.array(gts.shape[::-1])).all()
    if three_d:
        assert case["spacing"].shape == (3,) and (case["spacing"] > 0).all()


@pytest.mark.parametrize("kind", SYNTHETIC_BOXPROMPT_KINDS)
def test_boxprompt_cases_follow_the_convention(kind):
    cases = SyntheticBoxPromptCases(2, kind, seed=0, image_size=(96, 128), volume_shape=(12, 48, 40))
    three_d = kind.startswith("3D")
    for case in cases:
        _check_case(case, three_d)
        assert case["imgs"].shape == ((12, 48, 40) if three_d else (96, 128, 3))
    again = SyntheticBoxPromptCases(2, kind, seed=0, image_size=(96, 128), volume_shape=(12, 48, 40))[1]
    np.testing.assert_array_equal(again["imgs"], cases[1]["imgs"])
    assert not np.array_equal(cases[0]["imgs"], cases[1]["imgs"])


@pytest.mark.parametrize("kwargs", [{"kind": "2DBox_Fundus"}, {"kind": "CT"}, {"image_size": (32, 256)}])
def test_boxprompt_cases_refuse_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticBoxPromptCases(1, **{"kind": "2DBox_CT", **kwargs})


def test_boxprompt_styles_differ_in_colour():
    mean_rgb = {k: SyntheticBoxPromptCases(1, f"2DBox_{k}", image_size=(64, 64))[0]["imgs"].reshape(-1, 3).mean(0)
                for k in ("CT", "Endoscopy", "Dermoscopy")}
    assert np.ptp(mean_rgb["CT"]) == 0  # grey, replicated to 3 channels
    assert mean_rgb["Endoscopy"][0] > mean_rgb["Endoscopy"][1] + 40  # pink-red mucosa
    assert mean_rgb["Dermoscopy"][0] > mean_rgb["Dermoscopy"][2] + 20  # skin tone


def test_write_synthetic_boxprompt_cases_round_trip(tmp_path):
    sizes = {"image_size": (64, 64), "volume_shape": (10, 32, 32)}
    paths = write_synthetic_boxprompt_cases(tmp_path, per_modality=1, seed=2, **sizes)
    assert sorted(p.name.rsplit("_synth", 1)[0] for p in paths) == sorted(SYNTHETIC_BOXPROMPT_KINDS)
    reference = {k: SyntheticBoxPromptCases(1, k, seed=2, **sizes)[0] for k in SYNTHETIC_BOXPROMPT_KINDS}
    for path in paths:
        case = read_boxprompt_case(path)
        kind = path.name.rsplit("_synth", 1)[0]
        assert case["modality"] == modality_of(path) == kind.split("_", 1)[1]
        for key in ("imgs", "gts", "boxes"):
            np.testing.assert_array_equal(case[key], reference[kind][key])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left


# ----------------------------------------------------------------------------- MIL bags
@pytest.mark.parametrize("instances", ["features", "images"])
def test_mil_bags_labels_consistent(instances):
    kwargs = {"bag_size": (3, 7), "instances": instances, "feature_dim": 8, "image_size": 12, "n_key": (1, 2)}
    bags = SyntheticMILBags(12, seed=0, **kwargs)
    assert int(bags.bag_labels.sum()) == 6
    for data, bag_label, instance_labels in bags:
        assert 3 <= len(data) <= 7 and len(instance_labels) == len(data)
        assert instance_labels.dtype == torch.int64 and bag_label == int(instance_labels.max())
        assert int(instance_labels.sum()) <= 2
        assert data.shape[1:] == ((8,) if instances == "features" else (3, 12, 12))
    assert torch.equal(SyntheticMILBags(12, seed=0, **kwargs)[0][0], bags[0][0])
    other = SyntheticMILBags(12, seed=0, split="test", **kwargs)
    assert bags.checksum != other.checksum


def test_mil_key_features_are_separable_and_shared_across_splits():
    def instances(split: str) -> tuple[np.ndarray, np.ndarray]:
        bags = SyntheticMILBags(40, feature_dim=16, seed=5, split=split)
        return (torch.cat([b[0] for b in bags]).numpy(), torch.cat([b[2] for b in bags]).numpy())

    x, y = instances("train")
    xt, yt = instances("test")
    classifier = LogisticRegression(max_iter=500, class_weight="balanced").fit(x, y)
    assert classifier.score(xt, yt) > 0.8  # same clusters in both splits


def test_collate_pads_variable_bags():
    bags = SyntheticMILBags(3, bag_size=(2, 6), feature_dim=5, seed=0)
    batch = collate_bags([bags[i] for i in range(3)])
    sizes = [len(bags[i][0]) for i in range(3)]
    assert batch.instances.shape == (3, max(sizes), 5)
    assert batch.mask.sum(1).tolist() == sizes
    assert batch.bag_labels.tolist() == [bags[i][1] for i in range(3)]
    assert (batch.instance_labels[~batch.mask] == -1).all() and (batch.instances[~batch.mask] == 0).all()
    torch.testing.assert_close(batch.instances[0, : sizes[0]], bags[0][0])

"""Box-prompt convention (names, boxes, npz read/write), MIL plumbing, and the real-data task builders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mdbench.data.boxprompt import (
    boxes_from_labels,
    case_filename,
    dims_of,
    modality_of,
    read_boxprompt_case,
    relabel_instances,
    save_boxprompt_case,
)
from mdbench.data.errors import CorruptFileError, DataNotFoundError
from mdbench.data.mil import tile_fractions, tile_image
from mdbench.data.tasks import CellSetBags, ISICImageBags, isic_image_bags, pbc_cell_set_bags

from conftest import real_dataset


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("2DBox_OCT_0001.npz", "OCT"),
        ("3DBox_CT_abdomen_12.npz", "CT"),
        ("2DBox_Endoscopy_cju0.npz", "Endoscopy"),
        ("2DBox_US_012_HC.npz", "US"),
        ("2DBox_X-Ray_chest.npz", "XRay"),
        ("2DBox_XRay_chest.npz", "XRay"),
        ("2DBox_Mammo_3.npz", "Mammography"),
        ("2DBox_Microscope_7.npz", "Microscopy"),
        ("3DBox_PET_1.npz", "PET"),
        ("/some/dir/3DBox_MR_hippocampus_004.npz", "MR"),
        ("retina_OCT_scan.npz", "OCT"),  # fall-back: OCT tried before the CT it contains
        ("liver_CT_7.npz", "CT"),
    ],
)
def test_modality_of(name, modality):
    assert modality_of(name) == modality


def test_modality_of_unknown_names_the_file():
    with pytest.raises(ValueError, match="holiday_photo.npz"):
        modality_of("holiday_photo.npz")


def test_case_filename_and_dims():
    assert case_filename("2DBox_US", "012 HC/a") == "2DBox_US_012_HC_a.npz"
    assert dims_of("3DBox_MR_x.npz") == 3 and dims_of("2DBox_US_x.npz") == 2
    with pytest.raises(ValueError):
        case_filename("US", "1")
    with pytest.raises(ValueError, match="scan.npz"):
        dims_of("scan.npz")


# ----------------------------------------------------------------------------- boxes and labels
def test_boxes_from_labels_2d_by_hand():
    gts = np.zeros((6, 8), dtype=np.uint8)
    gts[2:4, 1:5] = 1  # rows 2-3, columns 1-4
    gts[5, 7] = 2  # one pixel in the corner
    np.testing.assert_array_equal(boxes_from_labels(gts), [[1, 2, 4, 3], [7, 5, 7, 5]])


def test_boxes_from_labels_3d_by_hand():
    gts = np.zeros((4, 5, 6), dtype=np.uint16)
    gts[1:3, 0:2, 3:6] = 1  # z 1-2, y 0-1, x 3-5
    np.testing.assert_array_equal(boxes_from_labels(gts), [[3, 0, 1, 5, 1, 2]])


def test_relabel_instances_drops_small_and_renumbers():
    labels = np.array([[0, 3, 3, 3], [5, 5, 0, 7], [0, 0, 0, 7]])
    np.testing.assert_array_equal(relabel_instances(labels, min_pixels=2), [[0, 1, 1, 1], [2, 2, 0, 3], [0, 0, 0, 3]])
    np.testing.assert_array_equal(relabel_instances(labels, min_pixels=3), [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


# ----------------------------------------------------------------------------- npz read / write
def _case_2d(labels: int = 2) -> dict:
    gts = np.zeros((16, 20), dtype=np.int64)
    for k in range(1, labels + 1):
        gts.flat[k * 3 : k * 3 + 2] = k  # distinct pixels in the first rows
    imgs = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    return {"imgs": imgs, "gts": gts, "boxes": boxes_from_labels(gts)}


def _case_3d() -> dict:
    gts = np.zeros((5, 8, 9), dtype=np.uint8)
    gts[1:4, 2:5, 3:8] = 1
    gts[2, 6, 1] = 2
    imgs = np.full((5, 8, 9), 7, dtype=np.uint8)
    return {"imgs": imgs, "gts": gts, "boxes": boxes_from_labels(gts), "spacing": np.array([2.5, 0.8, 0.8])}


def test_round_trip_2d_and_3d(tmp_path):
    for name, case in (("2DBox_Dermoscopy_a.npz", _case_2d()), ("3DBox_CT_b.npz", _case_3d())):
        save_boxprompt_case(tmp_path / name, **case)
        read = read_boxprompt_case(tmp_path / name)
        for key, value in case.items():
            np.testing.assert_array_equal(read[key], value)
        assert read["imgs"].dtype == np.uint8 and read["gts"].dtype == np.uint8
        assert read["name"] == name and read["dims"] == dims_of(name)
    assert read_boxprompt_case(tmp_path / "3DBox_CT_b.npz")["modality"] == "CT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2DBox_Dermoscopy_a.npz", "3DBox_CT_b.npz"]


def test_case_of_unknown_modality_is_read_with_modality_none(tmp_path):
    # DAFT routes such a case to its general model instead of dropping it; the arrays tell 2D from 3D
    for name, case, dims in (("2DBox_Histology_a.npz", _case_2d(), 2), ("case_17.npz", _case_2d(), 2),
                             ("volume_9.npz", _case_3d(), 3)):
        read = read_boxprompt_case(_write_npz(tmp_path / name, **case))
        assert read["modality"] is None and read["dims"] == dims and read["name"] == name


def test_many_labels_are_stored_as_uint16(tmp_path):
    case = _case_2d(labels=3)
    case["gts"][case["gts"] == 3] = 300
    case["boxes"] = boxes_from_labels(case["gts"])  # find_objects gives 3 boxes: labels 1, 2, 300
    save_boxprompt_case(tmp_path / "2DBox_US_many.npz", **case)
    read = read_boxprompt_case(tmp_path / "2DBox_US_many.npz")
    assert read["gts"].dtype == np.uint16 and read["gts"].max() == 300


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("boxes"), "missing key"),
        (lambda c: c.update(boxes=np.array([[0, 0, 3]])), "boxes must be"),
        (lambda c: c.update(boxes=np.array([[0, 0, 20, 3]])), "boxes must satisfy"),  # x_max = W
        (lambda c: c.update(boxes=np.array([[5, 0, 2, 3]])), "boxes must satisfy"),  # x_min > x_max
        (lambda c: c.update(boxes=np.array([[0.0, 0.0, np.nan, 3.0]])), "boxes must satisfy"),  # not finite
        (lambda c: c.update(imgs=c["imgs"].astype(np.float32)), "uint8"),
        (lambda c: c.update(imgs=c["imgs"][..., 0]), r"\(H,W,3\)"),
        (lambda c: c.update(gts=c["gts"][:-1]), "gts must be"),
    ],
)
def test_malformed_2d_case_is_refused_naming_the_file(tmp_path, change, message):
    case = _case_2d()
    change(case)
    path = _write_npz(tmp_path / "2DBox_Fundus_bad.npz", **case)
    with pytest.raises(CorruptFileError, match=message) as info:
        read_boxprompt_case(path)
    assert "2DBox_Fundus_bad.npz" in str(info.value)


def test_3d_case_without_spacing_is_refused(tmp_path):
    case = _case_3d()
    del case["spacing"]
    with pytest.raises(CorruptFileError, match="spacing"):
        read_boxprompt_case(_write_npz(tmp_path / "3DBox_MR_x.npz", **case))


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "2DBox_US_garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(CorruptFileError, match="2DBox_US_garbage.npz"):
        read_boxprompt_case(garbage)
    with pytest.raises(DataNotFoundError, match="2DBox_US_absent.npz"):
        read_boxprompt_case(tmp_path / "2DBox_US_absent.npz")


def test_gts_optional_only_when_allowed(tmp_path):
    case = _case_2d()
    del case["gts"]
    path = _write_npz(tmp_path / "2DBox_US_input.npz", **case)
    assert "gts" not in read_boxprompt_case(path, require_gts=False)
    with pytest.raises(CorruptFileError, match="gts"):
        read_boxprompt_case(path)


def test_save_refuses_bad_case_and_leaves_nothing(tmp_path):
    case = _case_2d()
    case["boxes"] = np.array([[0, 0, 99, 3]])
    with pytest.raises(ValueError, match="2DBox_US_bad.npz"):
        save_boxprompt_case(tmp_path / "2DBox_US_bad.npz", **case)
    with pytest.raises(ValueError, match="naming convention"):
        save_boxprompt_case(tmp_path / "case.npz", **_case_2d())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- MIL plumbing
def test_tiles_and_fractions_by_hand():
    image = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    tiles = tile_image(image, 4)
    assert tiles.shape == (4, 2, 4, 4)
    torch.testing.assert_close(tiles[1], image[:, 0:4, 4:8])  # row-major: tile 1 is top right
    torch.testing.assert_close(tiles[2], image[:, 4:8, 0:4])
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[0:2, 0:4] = 1  # half of tile 0
    mask[4:8, 4:8] = 1  # all of tile 3
    assert tile_fractions(mask, 4).tolist() == [0.5, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="5-pixel"):
        tile_image(image, 5)


class _FakeClassification(torch.utils.data.Dataset):
    """A real-loader look-alike: ``labels`` over all cases, ``indices`` for the split; image = its case id."""

    classes = ("a", "key", "b", "other")
    checksum = "fake"

    def __init__(self, labels: list[int], indices: list[int], split: str = "train") -> None:
        self.labels, self.indices, self.split = labels, np.asarray(indices), split

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        case = int(self.indices[i])
        return torch.full((1, 2, 2), float(case)), self.labels[case]


def test_cell_set_bags_on_fake_split():
    labels = [0, 1, 2, 3] * 10
    split = _FakeClassification(labels, indices=list(range(0, 40, 2)) + list(range(1, 40, 4)))
    kwargs = {"n_bags": 10, "bag_size": (3, 5), "n_key": (1, 2), "key_class": "key", "negative_classes": ("a", "b")}
    bags = CellSetBags(split, seed=0, **kwargs)
    assert len(bags) == 10 and int(bags.bag_labels.sum()) == 5
    for instances, bag_label, instance_labels in bags:
        cases = instances[:, 0, 0, 0].long().tolist()
        assert len(set(cases)) == len(cases)  # no image twice in a bag
        assert all(c in split.indices for c in cases)  # only this split's images
        assert instance_labels.tolist() == [int(labels[c] == 1) for c in cases]
        assert all(labels[c] in (0, 1, 2) for c in cases)  # "other" is in neither pool
        assert bag_label == int(instance_labels.max())
    same = CellSetBags(split, seed=0, **kwargs)
    assert bags.checksum == same.checksum and all(np.array_equal(a[0], b[0]) for a, b in zip(bags.bags, same.bags, strict=True))
    with pytest.raises(ValueError, match="distinct"):
        CellSetBags(split, 4, key_class="key", negative_classes=("key",))
    with pytest.raises(ValueError, match="need at least"):
        CellSetBags(split, 4, bag_size=(3, 50), key_class="key", negative_classes=("a",))


def test_disjoint_cell_sets_share_no_image_and_stop_when_the_images_run_out():
    labels = [0, 1, 2, 3] * 10  # 10 key images ("key" = 1) and 20 negatives ("a", "b")
    split = _FakeClassification(labels, indices=list(range(40)))
    kwargs = {"bag_size": (3, 5), "n_key": (1, 2), "key_class": "key", "negative_classes": ("a", "b")}
    few = CellSetBags(split, 4, seed=0, disjoint=True, **kwargs)
    cases = [int(c) for items, _ in few.bags for c in items]
    assert len(few) == 4 and len(set(cases)) == len(cases)  # no image in two bags
    assert [int(y) for y in few.bag_labels] == [int(t.max()) for _, _, t in few]
    many = CellSetBags(split, 40, seed=0, disjoint=True, **kwargs)
    cases = [int(c) for items, _ in many.bags for c in items]
    assert len(many) < 40 and len(many.bag_labels) == len(many) and len(set(cases)) == len(cases)
    keys = sum(labels[c] == 1 for c in cases)
    assert keys > 10 - 2 or len(cases) - keys > 20 - 5  # it stopped at a bag the unused images could not fill
    shared = CellSetBags(split, 4, seed=0, **kwargs)
    assert shared.checksum != few.checksum
    assert shared.checksum == CellSetBags(split, 4, seed=0, disjoint=False, **kwargs).checksum


class _FakeSegmentation(torch.utils.data.Dataset):
    classes = ("melanoma", "seborrheic_keratosis", "nevus")
    checksum, split = "fake", "test"

    def __init__(self, masks: list[torch.Tensor], labels: list[int]) -> None:
        self.masks, self.labels, self.indices = masks, labels, np.arange(len(masks))

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.rand(3, 8, 8), "mask": self.masks[i], "id": str(i)}


def test_isic_bags_instance_labels_by_hand():
    big = torch.zeros(8, 8, dtype=torch.long)
    big[0:4, 0:3] = 1  # 12 of tile 0's 16 pixels: 0.75
    big[4:8, 4:6] = 1  # tile 3: 0.5
    small = torch.zeros(8, 8, dtype=torch.long)
    small[5, 1] = 1  # one pixel in tile 2
    bags = ISICImageBags(_FakeSegmentation([big, big, small], labels=[0, 2, 0]), tile=4, lesion_fraction=0.6)
    tiles, label, instance_labels = bags[0]
    assert tiles.shape == (4, 3, 4, 4) and label == 1 and instance_labels.tolist() == [1, 0, 0, 0]
    assert bags[1][1] == 0 and bags[1][2].tolist() == [0, 0, 0, 0]  # nevus: no key instance
    assert bags[2][2].tolist() == [0, 0, 1, 0]  # tiny melanoma: its most-lesion tile


# ----------------------------------------------------------------------------- real data (a handful of cases)
@pytest.mark.real_data
def test_isic_image_bags_real(real_data_dir):
    real_dataset(real_data_dir, "isic2017")
    bags = isic_image_bags("test", grid=4, tile=32, data_dir=real_data_dir)
    positives = np.flatnonzero(bags.bag_labels)
    for index in (0, int(positives[0])):
        tiles, bag_label, instance_labels = bags[index]
        assert tiles.shape == (16, 3, 32, 32) and 0 <= tiles.min() and tiles.max() <= 1
        assert bag_label == int(instance_labels.max())


@pytest.mark.real_data
def test_pbc_cell_set_bags_real_splits_disjoint(real_data_dir):
    real_dataset(real_data_dir, "pbc")
    train = pbc_cell_set_bags("train", n_bags=6, image_size=32, data_dir=real_data_dir)
    test = pbc_cell_set_bags("test", n_bags=6, image_size=32, data_dir=real_data_dir)
    files = [{str(b.images.files[i]) for items, _ in b.bags for i in items} for b in (train, test)]
    assert files[0] and files[1] and not files[0] & files[1]
    instances, bag_label, instance_labels = train[int(np.flatnonzero(train.bag_labels)[0])]
    assert instances.shape[1:] == (3, 32, 32) and bag_label == 1 == int(instance_labels.max())

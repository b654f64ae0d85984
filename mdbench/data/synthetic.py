"""Synthetic stand-ins for the real datasets: deterministic from a seed, generated on the fly, no files.

Four generators, each a ``torch.utils.data.Dataset`` with ``.checksum`` (hash of generator name,
parameters and seed), ``.classes`` and ``.split``; data cards in ``data_cards/synthetic_*.md``:

- :class:`SyntheticClassification`: 2D images whose class is an oriented texture (grating) inside a
  random soft shape, under colour tint and noise. Items ``(image (C,H,W) float in [0,1], label int)``.
- :class:`SyntheticBoxPromptCases`: box-prompt segmentation cases in modality styles (2D CT, MR, US,
  Endoscopy, Dermoscopy; 3D CT, MR) in the MedSAM-on-Laptop ``.npz`` convention (see
  :mod:`mdbench.data.boxprompt`); :func:`write_synthetic_boxprompt_cases` writes them to disk.
- :class:`SyntheticVolumes`: 3D multi-class volumes shaped like MSD Task04 Hippocampus items.
- :class:`SyntheticMILBags`: multiple-instance bags (feature vectors or small images) with
  instance labels, positive iff the bag holds at least one key instance.

Every item is drawn from its own generator seeded by ``(seed, split, index)``, so an item does not
depend on ``n`` or on which items were read before it, and the splits never share an item.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from mdbench.data.boxprompt import boxes_from_labels, case_filename, relabel_instances, save_boxprompt_case
from mdbench.data.mil import balanced_bag_labels, draw_instance_labels
from mdbench.data.splits import SPLITS, check_split


# ----------------------------------------------------------------------------- shared helpers
def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent generator for ``(seed, *keys)``; strings enter through a stable CRC32."""
    entropy = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def params_checksum(generator: str, params: dict, seed: int) -> str:
    """SHA-256 of a generator/builder name, its parameters and the seed: identifies derived data exactly."""
    payload = json.dumps({"generator": generator, "params": params, "seed": int(seed)}, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (textures, bias fields)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _star_radius(
    rng: np.random.Generator,
    shape: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    roughness: float,
    harmonics: int = 5,
) -> np.ndarray:
    """Normalised radial coordinate of a randomly rotated, star-shaped blob: ``<= 1`` inside.

    The boundary is an ellipse with radii ``(ry, rx)`` whose radius is modulated by random
    harmonics ``k = 2..harmonics+1`` of amplitude ``~ roughness / k`` (smooth for polyps and
    organs, ragged for skin lesions). Returns an (H,W) float32 array.
    """
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - center[0], xx - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radii[1]
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radii[0]
    theta = np.arctan2(v, u)
    k = np.arange(2, 2 + harmonics)
    amplitude = roughness * rng.uniform(0, 1, harmonics) / k
    phase = rng.uniform(0, 2 * np.pi, harmonics)
    boundary = 1 + np.tensordot(amplitude, np.cos(k[:, None, None] * theta + phase[:, None, None]), axes=1)
    return (np.hypot(u, v) / np.maximum(boundary, 0.2)).astype(np.float32)


# ----------------------------------------------------------------------------- 2D classification
def _class_pattern(rng: np.random.Generator, label: int, num_classes: int, size: int, channels: int) -> np.ndarray:
    """One (C,size,size) float32 image in [0,1] of class ``label``.

    The class sets the orientation ``pi * label / num_classes`` and the frequency (two levels,
    alternating with the class) of a grating; phase, position and shape of the soft window it sits in,
    contrast, colour tint, background texture and noise are random nuisances. The grating has zero
    mean, so brightness and colour carry no class information.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = np.pi * label / num_classes + rng.normal(0, 0.05)
    cycles = (3.0 if label % 2 == 0 else 5.0) * rng.uniform(0.9, 1.1)  # cycles per image side
    grating = np.sin(2 * np.pi * cycles * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    center = rng.uniform(0.3, 0.7, 2) * size
    radius = _star_radius(rng, (size, size), (center[0], center[1]), tuple(rng.uniform(0.3, 0.5, 2) * size), 0.3)
    window = np.clip((1.2 - radius) / 0.4, 0, 1)
    background = 0.08 * _smooth_field(rng, (size, size), size / 8)
    gray = 0.5 + rng.uniform(0.2, 0.35) * window * grating + background
    tint = rng.uniform(0.7, 1.0, channels)[:, None, None]
    image = tint * gray[None] + rng.normal(0, 0.12, (channels, size, size))
    return np.clip(image, 0, 1).astype(np.float32)


class SyntheticClassification(Dataset):
    """2D classification by oriented texture: learnable by a small CNN in a CPU minute, chance untrained.

    Args:
        n: number of images.
        num_classes: number of classes (labels ``0..num_classes-1``, balanced within ±1).
        image_size: side of the square images.
        channels: image channels (the tint differs per channel when ``channels > 1``).
        seed: non-negative seed; the same seed gives the same data.
        split: ``"train"``, ``"val"`` or ``"test"``; each split draws different images.

    Items: ``(image FloatTensor (channels, image_size, image_size) in [0,1], label int)``.
    """

    def __init__(
        self, n: int, num_classes: int = 4, image_size: int = 32, channels: int = 3, seed: int = 0, split: str = "train"
    ) -> None:
        _check_seed(seed)
        check_split(split, SPLITS)
        if n < 1 or num_classes < 2 or image_size < 8 or channels < 1:
            raise ValueError(
                f"need n >= 1, num_classes >= 2, image_size >= 8, channels >= 1; "
                f"got n={n}, num_classes={num_classes}, image_size={image_size}, channels={channels}"
            )
        self.n, self.num_classes, self.image_size, self.channels = n, num_classes, image_size, channels
        self.seed, self.split = seed, split
        self.classes = tuple(f"texture_{k}" for k in range(num_classes))
        self.labels = _rng(seed, split, "labels").permutation(np.arange(n) % num_classes)
        params = {"n": n, "num_classes": num_classes, "image_size": image_size, "channels": channels, "split": split}
        self.checksum = params_checksum("SyntheticClassification", params, seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        label = int(self.labels[index])
        rng = _rng(self.seed, self.split, index)
        image = _class_pattern(rng, label, self.num_classes, self.image_size, self.channels)
        return torch.from_numpy(image), label


# ----------------------------------------------------------------------------- 2D modality styles
def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)


def _paint_objects(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_objects: int,
    center_box: tuple[float, float, float, float],
    radius_range: tuple[float, float],
    roughness: float,
) -> list[np.ndarray]:
    """Normalised radial maps (see :func:`_star_radius`) of ``n_objects`` blobs.

    Centres are uniform in ``center_box = (y0, x0, y1, x1)``; radii are fractions of the short side.
    """
    short = min(shape)
    radials = []
    for _ in range(n_objects):
        center = (rng.uniform(center_box[0], center_box[2]), rng.uniform(center_box[1], center_box[3]))
        radii = tuple(rng.uniform(*radius_range, 2) * short)
        radials.append(_star_radius(rng, shape, center, radii, roughness))
    return radials


def _render_ct(rng: np.random.Generator, shape: tuple[int, int], n_objects: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Abdominal-CT-like slice: dark air, soft-tissue body, bright vertebra, enhancing organs; Gaussian noise."""
    h, w = shape
    body = _star_radius(rng, shape, (h * rng.uniform(0.48, 0.52), w / 2), (h * 0.38, w * 0.45), 0.08) <= 1
    image = np.where(body, 0.40 + 0.02 * _smooth_field(rng, shape, 4), 0.0)
    fat = body & (_star_radius(rng, shape, (h / 2, w / 2), (h * 0.33, w * 0.40), 0.05) > 1)
    image[fat] = 0.30  # subcutaneous fat is darker than muscle and organs
    spine = _star_radius(rng, shape, (h * 0.75, w / 2), (h * 0.06, w * 0.06), 0.05) <= 1
    image[spine] = 0.9
    radials = _paint_objects(rng, shape, n_objects, (0.35 * h, 0.3 * w, 0.62 * h, 0.7 * w), (0.05, 0.12), 0.15)
    for radial in radials:
        image[radial <= 1] = rng.uniform(0.55, 0.75) + 0.02 * _smooth_field(rng, shape, 3)[radial <= 1]
    image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 0.03, shape)  # partial volume, quantum noise
    return _gray_to_rgb(image), radials


def _render_mr(rng: np.random.Generator, shape: tuple[int, int], n_objects: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Brain-MR-like slice: head ellipse with textured tissue, bright or dark structures, bias field, Rician noise."""
    h, w = shape
    head = _star_radius(rng, shape, (h / 2, w / 2), (h * 0.42, w * 0.36), 0.05) <= 1
    image = np.where(head, 0.40 + 0.06 * _smooth_field(rng, shape, 6), 0.0)
    radials = _paint_objects(rng, shape, n_objects, (0.3 * h, 0.3 * w, 0.7 * h, 0.7 * w), (0.05, 0.12), 0.2)
    for radial in radials:
        image[radial <= 1] = rng.choice([rng.uniform(0.12, 0.22), rng.uniform(0.65, 0.8)])
    bias = np.exp(0.15 * _smooth_field(rng, shape, min(shape) / 3))  # smooth coil sensitivity
    image = ndimage.gaussian_filter(image, 0.6) * bias
    image = np.hypot(image + rng.normal(0, 0.04, shape), rng.normal(0, 0.04, shape))  # Rician magnitude noise
    return _gray_to_rgb(image), radials


def _render_us(rng: np.random.Generator, shape: tuple[int, int], n_objects: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fetal-head-ultrasound-like frame: fan-shaped sector, speckle, depth attenuation, skull ellipse."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    apex_y = -0.05 * h
    depth = np.hypot(yy - apex_y, xx - w / 2) / h
    fan = (np.abs(np.arctan2(xx - w / 2, yy - apex_y)) < rng.uniform(0.5, 0.65)) & (depth > 0.1) & (depth < 1.0)
    echo = 0.35 + 0.08 * _smooth_field(rng, shape, 5)
    radials = _paint_objects(rng, shape, n_objects, (0.45 * h, 0.4 * w, 0.6 * h, 0.6 * w), (0.18, 0.26), 0.03)
    for radial in radials:
        echo = np.where(radial <= 0.93, 0.15 + 0.05 * _smooth_field(rng, shape, 3), echo)  # fluid / brain
        echo = np.where((radial > 0.93) & (radial <= 1.0), 0.9, echo)  # bright skull echo
    speckle = ndimage.gaussian_filter(rng.rayleigh(np.sqrt(2 / np.pi), shape), 0.8)  # mean-one, correlated
    image = echo * speckle * np.exp(-0.8 * depth) * fan
    for radial in radials:
        radial[~fan] = np.inf  # nothing is visible or labelled outside the sector
    return _gray_to_rgb(image), radials


def _specular(rng: np.random.Generator, image: np.ndarray, n_spots: int, region: np.ndarray) -> None:
    """Paint ``n_spots`` small saturated-white reflections at random pixels of ``region`` (in place)."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return
    for i in rng.choice(len(ys), size=min(n_spots, len(ys)), replace=False):
        r = rng.uniform(1.0, 3.0)
        y0, x0 = ys[i], xs[i]
        sl = (slice(max(0, int(y0 - r)), int(y0 + r) + 1), slice(max(0, int(x0 - r)), int(x0 + r) + 1))
        image[sl] = 0.98


def _render_endoscopy(
    rng: np.random.Generator, shape: tuple[int, int], n_objects: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Colonoscopy-like frame: pink mucosa with vessels, central light fall-off, dome-shaded polyps, glare."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rho = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    mucosa = np.array([0.82, 0.45, 0.40]) * rng.uniform(0.9, 1.05, 3)
    texture = 1 + 0.06 * _smooth_field(rng, shape, 6)
    image = mucosa * texture[..., None]
    vessels = np.abs(_smooth_field(rng, shape, 5)) < 0.05
    image[vessels] *= np.array([0.85, 0.6, 0.6])
    radials = _paint_objects(rng, shape, n_objects, (0.3 * h, 0.3 * w, 0.7 * h, 0.7 * w), (0.08, 0.2), 0.12)
    for radial in radials:
        inside = radial <= 1
        dome = np.sqrt(np.clip(1 - radial**2, 0, 1))[..., None]  # lit from the camera
        polyp = mucosa * np.array([1.05, 0.85, 0.85]) * (0.75 + 0.35 * dome)
        image = np.where(inside[..., None], polyp, image)
        _specular(rng, image, int(rng.integers(1, 4)), inside & (radial < 0.5))
    image *= np.clip(1.15 - 0.55 * rho**2, 0, 1)[..., None]
    _specular(rng, image, int(rng.integers(2, 8)), rho < 0.9)
    image[rho > 1.25] = 0.0  # black corners outside the endoscope's field of view
    image += rng.normal(0, 0.015, image.shape)
    return np.clip(image, 0, 1), radials


def _render_dermoscopy(
    rng: np.random.Generator, shape: tuple[int, int], n_objects: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dermoscopy-like image: skin tone, ragged variegated brown lesion with soft border, hairs, dark vignette."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([0.88, 0.68, 0.58]) * rng.uniform(0.8, 1.05)
    image = skin * (1 + 0.03 * _smooth_field(rng, shape, 8))[..., None]
    radials = _paint_objects(rng, shape, n_objects, (0.35 * h, 0.35 * w, 0.65 * h, 0.65 * w), (0.15, 0.3), 0.5)
    for radial in radials:
        brown = np.array([0.45, 0.30, 0.22]) * rng.uniform(0.6, 1.1)
        variegation = np.clip(0.85 + 0.15 * _smooth_field(rng, shape, 4) - 0.2 * (1 - np.clip(radial, 0, 1)), 0.3, 1.2)
        alpha = np.clip((1.04 - radial) / 0.08, 0, 1)[..., None]  # soft border straddling the outline
        image = (1 - alpha) * image + alpha * brown * variegation[..., None]
    for _ in range(int(rng.integers(0, 6))):  # hairs: dark quadratic curves one pixel wide
        p = rng.uniform(0, 1, (3, 2)) * np.array([h, w])
        t = np.linspace(0, 1, 4 * (h + w))[:, None]
        curve = (1 - t) ** 2 * p[0] + 2 * t * (1 - t) * p[1] + t**2 * p[2]
        ys, xs = np.clip(curve.astype(int), 0, [h - 1, w - 1]).T
        image[ys, xs] = np.array([0.2, 0.13, 0.1])
    rho = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    image[rho > 1.3] *= 0.15  # dark ring of the dermatoscope lens
    image += rng.normal(0, 0.015, image.shape)
    return np.clip(image, 0, 1), radials


_STYLES_2D: dict[str, Callable[..., tuple[np.ndarray, list[np.ndarray]]]] = {
    "CT": _render_ct,
    "MR": _render_mr,
    "US": _render_us,
    "Endoscopy": _render_endoscopy,
    "Dermoscopy": _render_dermoscopy,
}
_DEFAULT_OBJECTS_2D = {"CT": (1, 3), "MR": (1, 3), "US": (1, 1), "Endoscopy": (1, 2), "Dermoscopy": (1, 1)}


def _instance_map(radials: list[np.ndarray], min_pixels: int) -> np.ndarray:
    """Instance labels 1..K from blob maps; later blobs cover earlier ones; blobs under ``min_pixels`` dropped."""
    labels = np.zeros(radials[0].shape, dtype=np.int64)
    for k, radial in enumerate(radials, start=1):
        labels[radial <= 1] = k
    return relabel_instances(labels, min_pixels)


# ----------------------------------------------------------------------------- 3D volumes
def _hippocampus_like_labels(rng: np.random.Generator, shape: tuple[int, int, int], num_classes: int) -> np.ndarray:
    """(D,H,W) labels of a curved, tapering tube along H cut into ``num_classes - 1`` adjacent segments.

    H runs posterior -> anterior as in the RAS-oriented MSD volumes: label 1 is the thick anterior
    head (large H), the last label the thin posterior tail (small H). Cross-sections are ellipses in
    (D,W) that bend along a quadratic centreline.
    """
    d, h, w = shape
    z, y, x = np.mgrid[0:d, 0:h, 0:w].astype(np.float32)
    y0, y1 = h * rng.uniform(0.12, 0.22), h * rng.uniform(0.78, 0.88)
    t = (y1 - y) / (y1 - y0)  # 0 at the anterior end (large H), 1 at the posterior end
    zc = d * (0.5 + rng.uniform(-0.05, 0.05)) + d * rng.uniform(-0.25, 0.25) * (t - 0.5) ** 2
    xc = w * (0.5 + rng.uniform(-0.05, 0.05)) + w * rng.uniform(-0.15, 0.15) * (t - 0.5)
    profile = 2 * np.sqrt(np.clip(t * (1 - t), 0, None)) * (1.25 - 0.5 * np.clip(t, 0, 1))  # thick head, thin tail
    rz = np.maximum(d * rng.uniform(0.14, 0.2) * profile, 1e-3)
    rx = np.maximum(w * rng.uniform(0.14, 0.2) * profile, 1e-3)
    inside = (t >= 0) & (t <= 1) & (((z - zc) / rz) ** 2 + ((x - xc) / rx) ** 2 <= 1)
    n_fg = num_classes - 1
    cuts = np.linspace(0, 1, n_fg + 1)[1:-1] + rng.uniform(-0.3, 0.3, n_fg - 1) / (n_fg + 1)
    return np.where(inside, 1 + np.searchsorted(np.sort(cuts), t), 0).astype(np.int64)


def _render_volume(rng: np.random.Generator, labels: np.ndarray, style: str) -> np.ndarray:
    """(D,H,W) float32 image in [0,1] for ``labels`` in an ``"MR"`` or ``"CT"`` style.

    Foreground segments differ by 0.04 in mean intensity per label, so a small model can separate
    adjacent segments quickly; their boundary is otherwise positional, as in the real hippocampus.
    """
    shape = labels.shape
    structure = labels > 0
    if style == "MR":
        image = 0.40 + 0.05 * _smooth_field(rng, shape, 3)
        csf = ndimage.binary_dilation(structure, iterations=2) & ~ndimage.binary_dilation(structure, iterations=1)
        image[csf & (rng.uniform(size=shape) < 0.5)] = 0.15  # partial dark rim, like the temporal horn
        image[structure] = 0.62 + 0.04 * labels[structure] + rng.uniform(-0.04, 0.04)
        image = ndimage.gaussian_filter(image, 0.7) * np.exp(0.1 * _smooth_field(rng, shape, max(shape) / 3))
        image = np.hypot(image + rng.normal(0, 0.03, shape), rng.normal(0, 0.03, shape))  # Rician noise
        return np.clip(image, 0, 1).astype(np.float32)
    if style == "CT":
        image = 0.42 + 0.02 * _smooth_field(rng, shape, 3)
        image[structure] = 0.65 + 0.04 * labels[structure]
        image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 0.03, shape)
        return np.clip(image, 0, 1).astype(np.float32)
    raise ValueError(f"unknown volume style {style!r}; expected 'MR' or 'CT'")


class SyntheticVolumes(Dataset):
    """3D multi-class volumes shaped like MSD Task04 Hippocampus items (MR style, 1 mm voxels).

    Args:
        n: number of volumes.
        shape: ``(D, H, W)``; the structure's long axis is H (posterior -> anterior).
        num_classes: classes including background (default 3: background, anterior, posterior).
        seed: non-negative seed.
        split: ``"train"``, ``"val"`` or ``"test"``.
        normalize: ``"zscore"`` (default, per volume, as the real loader) or ``"minmax"`` (to [0,1]).

    Items: ``{"image": FloatTensor (1,D,H,W), "label": LongTensor (D,H,W) in 0..num_classes-1,
    "spacing": (1.0, 1.0, 1.0), "id": str}``, as :class:`mdbench.data.msd_hippocampus.MSDHippocampusDataset`.
    """

    def __init__(
        self,
        n: int,
        shape: tuple[int, int, int] = (32, 48, 32),
        num_classes: int = 3,
        seed: int = 0,
        split: str = "train",
        normalize: str = "zscore",
    ) -> None:
        _check_seed(seed)
        check_split(split, SPLITS)
        if normalize not in ("zscore", "minmax"):
            raise ValueError(f"normalize must be 'zscore' or 'minmax', got {normalize!r}")
        if n < 1 or num_classes < 2 or len(shape) != 3 or min(shape) < 8:
            raise ValueError(
                f"need n >= 1, num_classes >= 2, a 3D shape >= 8 per side; got {n}, {num_classes}, {shape}"
            )
        d, h, w = shape  # three sides, checked above
        self.n, self.shape, self.num_classes, self.seed, self.split = n, (d, h, w), num_classes, seed, split
        self.normalize = normalize
        self.classes = ("background", "anterior", "posterior") if num_classes == 3 else tuple(
            ["background"] + [f"segment_{k}" for k in range(1, num_classes)]
        )
        params = {"n": n, "shape": list(self.shape), "num_classes": num_classes, "split": split, "normalize": normalize}
        self.checksum = params_checksum("SyntheticVolumes", params, seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = _rng(self.seed, self.split, index)
        labels = _hippocampus_like_labels(rng, self.shape, self.num_classes)
        image = _render_volume(rng, labels, "MR")
        if self.normalize == "zscore":
            image = (image - image.mean()) / max(float(image.std()), 1e-8)
        else:
            image = (image - image.min()) / max(float(np.ptp(image)), 1e-8)
        return {
            "image": torch.from_numpy(image)[None],
            "label": torch.from_numpy(labels),
            "spacing": (1.0, 1.0, 1.0),
            "id": f"synthetic_{self.split}_{index:04d}",
        }


# ----------------------------------------------------------------------------- box-prompt cases
SYNTHETIC_BOXPROMPT_KINDS = tuple(f"2DBox_{m}" for m in _STYLES_2D) + ("3DBox_CT", "3DBox_MR")
_SPACING_3D = {"MR": (1.0, 1.0, 1.0), "CT": (2.5, 0.8, 0.8)}  # per array axis (D,H,W), in mm


def synthetic_boxprompt_case(
    kind: str,
    rng: np.random.Generator,
    image_size: tuple[int, int] = (256, 256),
    volume_shape: tuple[int, int, int] = (24, 96, 96),
    min_pixels: int = 20,
) -> dict[str, np.ndarray]:
    """One case of ``kind`` (one of :data:`SYNTHETIC_BOXPROMPT_KINDS`) in the challenge convention.

    2D: ``imgs`` (H,W,3) uint8, ``gts`` (H,W) uint8 instance labels 1..K, ``boxes`` (K,4)
    ``[x_min, y_min, x_max, y_max]``. 3D: ``imgs`` (D,H,W) uint8, ``gts`` (D,H,W) uint8, ``boxes``
    (K,6) ``[x_min, y_min, z_min, x_max, y_max, z_max]``, ``spacing`` (3,) float64. Box corners are
    inclusive pixel indices of the object's bounding box.
    """
    if kind not in SYNTHETIC_BOXPROMPT_KINDS:
        raise ValueError(f"unknown synthetic box-prompt kind {kind!r}; expected one of {SYNTHETIC_BOXPROMPT_KINDS}")
    modality = kind.split("_", 1)[1]
    if kind.startswith("3D"):
        d, h, w = volume_shape  # a list (YAML, notebook parameter) works too
        labels = _hippocampus_like_labels(rng, (d, h, w), 3)
        image = _render_volume(rng, labels, modality)
        case = {"imgs": np.round(image * 255).astype(np.uint8), "gts": relabel_instances(labels).astype(np.uint8)}
        case["spacing"] = np.asarray(_SPACING_3D[modality], dtype=np.float64)
    else:
        n_objects = int(rng.integers(_DEFAULT_OBJECTS_2D[modality][0], _DEFAULT_OBJECTS_2D[modality][1] + 1))
        image, radials = _STYLES_2D[modality](rng, tuple(image_size), n_objects)
        labels = _instance_map(radials, min_pixels)
        case = {"imgs": np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), "gts": labels.astype(np.uint8)}
    case["boxes"] = boxes_from_labels(case["gts"])
    return case


class SyntheticBoxPromptCases(Dataset):
    """``n`` synthetic box-prompt cases of one ``kind`` (e.g. ``"2DBox_US"``, ``"3DBox_MR"``).

    Items are dicts of numpy arrays as in :func:`synthetic_boxprompt_case`, plus ``"id"``. Every case
    has at least one object: the last blob painted is never covered, and at image sides >= 64 (checked)
    it is larger than the 20-pixel floor.
    """

    def __init__(
        self,
        n: int,
        kind: str,
        seed: int = 0,
        split: str = "train",
        image_size: tuple[int, int] = (256, 256),
        volume_shape: tuple[int, int, int] = (24, 96, 96),
    ) -> None:
        _check_seed(seed)
        check_split(split, SPLITS)
        if kind not in SYNTHETIC_BOXPROMPT_KINDS:
            raise ValueError(f"unknown synthetic box-prompt kind {kind!r}; expected one of {SYNTHETIC_BOXPROMPT_KINDS}")
        if n < 1 or min(image_size) < 64 or min(volume_shape) < 8:
            raise ValueError(
                f"need n >= 1, image sides >= 64 and volume sides >= 8 (so every case keeps an object); "
                f"got n={n}, image_size={image_size}, volume_shape={volume_shape}"
            )
        self.n, self.kind, self.seed, self.split = n, kind, seed, split
        # tuple() so that lists (YAML, notebook parameters) work too; the lengths are the annotated ones
        self.image_size = cast(tuple[int, int], tuple(image_size))
        self.volume_shape = cast(tuple[int, int, int], tuple(volume_shape))
        self.classes = ("background", "object")
        params = {"n": n, "kind": kind, "split": split, "image_size": list(self.image_size)}
        params["volume_shape"] = list(self.volume_shape)
        self.checksum = params_checksum("SyntheticBoxPromptCases", params, seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = _rng(self.seed, self.split, self.kind, index)
        case = synthetic_boxprompt_case(self.kind, rng, self.image_size, self.volume_shape)
        return {**case, "id": f"synth_{self.split}_{index:04d}"}


def write_synthetic_boxprompt_cases(
    out_dir: str | Path,
    per_modality: int,
    seed: int = 0,
    split: str = "train",
    kinds: Sequence[str] = SYNTHETIC_BOXPROMPT_KINDS,
    image_size: tuple[int, int] = (256, 256),
    volume_shape: tuple[int, int, int] = (24, 96, 96),
) -> list[Path]:
    """Write ``per_modality`` cases of every kind as ``<kind>_synth_<split>_<NNNN>.npz``; returns the paths.

    Files are written atomically (see :func:`mdbench.data.boxprompt.save_boxprompt_case`).
    """
    out_dir = Path(out_dir)
    paths = []
    for kind in kinds:
        cases = SyntheticBoxPromptCases(per_modality, kind, seed, split, image_size, volume_shape)
        for index in range(len(cases)):
            case = cases[index]
            path = out_dir / case_filename(kind, case.pop("id"))
            save_boxprompt_case(path, **case)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------- MIL bags
class SyntheticMILBags(Dataset):
    """Multiple-instance bags: a bag is positive iff it holds at least one key instance.

    Args:
        n_bags: number of bags (``round(n_bags * positive_fraction)`` positive, shuffled).
        bag_size: inclusive ``(min, max)`` number of instances per bag.
        instances: ``"features"`` (vectors for MIL heads) or ``"images"`` (small images for training a
            patch encoder end to end).
        feature_dim: vector length when ``instances="features"``.
        image_size, channels: instance image shape when ``instances="images"``.
        n_key: inclusive ``(min, max)`` key instances in a positive bag (clipped to the bag size).
        positive_fraction: share of positive bags.
        seed: non-negative seed; it also fixes the instance distributions, shared by all splits.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Feature instances: negatives come from 4 Gaussian clusters (unit variance), key instances from a
    fifth cluster; all five centres are exactly 2.5 standard deviations apart. Image instances: the
    textures of :class:`SyntheticClassification` with 4 classes; key instances are texture 0,
    negatives textures 1-3.

    Items: ``(instances FloatTensor (n, feature_dim) or (n, channels, image_size, image_size),
    bag_label int, instance_labels LongTensor (n,))``; collate with :func:`mdbench.data.mil.collate_bags`.
    """

    _N_NEGATIVE_CLUSTERS = 4

    def __init__(
        self,
        n_bags: int,
        bag_size: tuple[int, int] = (8, 16),
        instances: str = "features",
        feature_dim: int = 32,
        image_size: int = 16,
        channels: int = 3,
        n_key: tuple[int, int] = (1, 3),
        positive_fraction: float = 0.5,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        _check_seed(seed)
        check_split(split, SPLITS)
        if instances not in ("features", "images"):
            raise ValueError(f"instances must be 'features' or 'images', got {instances!r}")
        if n_bags < 1 or not 1 <= bag_size[0] <= bag_size[1] or not 1 <= n_key[0] <= n_key[1]:
            raise ValueError(f"need n_bags >= 1 and ranges 1 <= min <= max; got {n_bags}, {bag_size}, {n_key}")
        if instances == "features" and feature_dim < self._N_NEGATIVE_CLUSTERS + 1:
            raise ValueError(f"feature_dim must be >= {self._N_NEGATIVE_CLUSTERS + 1}, got {feature_dim}")
        if instances == "images" and (image_size < 8 or channels < 1):
            raise ValueError(f"need image_size >= 8 and channels >= 1, got {image_size} and {channels}")
        self.n_bags, self.instances = n_bags, instances
        # tuple() so that lists (YAML, notebook parameters) work too; (min, max) pairs as annotated
        self.bag_size, self.n_key = cast(tuple[int, int], tuple(bag_size)), cast(tuple[int, int], tuple(n_key))
        self.feature_dim, self.image_size, self.channels = feature_dim, image_size, channels
        self.seed, self.split = seed, split
        self.classes = ("negative", "positive")
        self.bag_labels = balanced_bag_labels(_rng(seed, split, "bag_labels"), n_bags, positive_fraction)
        # orthonormal directions scaled so that every two cluster centres lie exactly 2.5 apart
        gaussian = _rng(seed, "clusters").standard_normal((feature_dim, self._N_NEGATIVE_CLUSTERS + 1))
        directions, _ = np.linalg.qr(gaussian)
        self._centers = directions.T * 2.5 / np.sqrt(2)
        params = {"n_bags": n_bags, "bag_size": list(bag_size), "instances": instances, "n_key": list(n_key)}
        params.update(positive_fraction=positive_fraction, split=split)
        if instances == "features":
            params["feature_dim"] = feature_dim
        else:
            params.update(image_size=image_size, channels=channels)
        self.checksum = params_checksum("SyntheticMILBags", params, seed)

    def __len__(self) -> int:
        return self.n_bags

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        if not 0 <= index < self.n_bags:
            raise IndexError(f"index {index} out of range for {self.n_bags} bags")
        rng = _rng(self.seed, self.split, index)
        bag_label = int(self.bag_labels[index])
        instance_labels = draw_instance_labels(rng, bag_label, self.bag_size, self.n_key)
        size = len(instance_labels)
        # cluster / texture index: 0 for key instances, 1..4 (features) or 1..3 (textures) for negatives
        n_neg_kinds = self._N_NEGATIVE_CLUSTERS if self.instances == "features" else 3
        kinds = np.where(instance_labels == 1, 0, rng.integers(1, n_neg_kinds + 1, size))
        if self.instances == "features":
            values = self._centers[kinds] + rng.standard_normal((size, self.feature_dim))
            data = torch.from_numpy(values.astype(np.float32))
        else:
            data = torch.from_numpy(
                np.stack([_class_pattern(rng, int(k), 4, self.image_size, self.channels) for k in kinds])
            )
        return data, bag_label, torch.from_numpy(instance_labels)

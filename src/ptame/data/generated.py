"""A seeded, procedurally generated image dataset with ground-truth object masks.

Each image (RGB, ``image_size`` px square) shows one object of one of up to eight shape classes
(:data:`CLASS_NAMES`) on a cluttered background: smooth colour noise, a few random lines, soft
blobs and pixel noise. The object has a random colour that contrasts with the background under
it, a random size (radius ``min_radius``..``max_radius`` of the image side), a random position
fully inside the image and a small rotation, so the class can be decided from the object only.
The boolean mask of every image holds exactly the pixels painted with the object colour.

Generation is vectorised torch on CPU and deterministic: the same :class:`GeneratedShapesSpec`
gives bit-identical tensors, and the train/val/test splits use independent seeds derived from
``spec.seed``. :func:`load_or_generate` caches the splits on disk.

Batches follow the project convention: dicts with ``image`` (float, [0, 1]), ``label``,
``mask`` and ``index``.

Two-object images (``objects_per_image=2``, ``data=generated_pairs``): every image of every
split holds two objects of different classes, placed apart (their shapes' extents do not touch),
each with its own colour and mask; items then also carry ``object_labels`` (2,) and
``object_masks`` (2, H, W), ``mask`` is the union of both objects and ``label`` the first
object's class. The classifiers of :mod:`ptame.data.generated_classifiers` learn both classes of
such images (a target of 1/2 on each), and class-specific localisation explains each object's
class in turn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
from filelock import FileLock
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ptame.data.resumable import EpochOrderSampler, ResumableLoader, resume_sampler, training_position
from ptame.io import torch_save_atomic

log = logging.getLogger(__name__)

#: Bump whenever the generator's output changes, so that cached datasets are regenerated.
GENERATOR_VERSION = 2

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "star",
    "diamond",
    "crescent",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Images are generated in chunks of this many (fixed, so that results never depend on it).
_CHUNK = 500
# How far (in object radii) the farthest point of any shape lies from its centre.
_SHAPE_EXTENT = 1.1


@dataclass(frozen=True)
class GeneratedShapesSpec:
    """Everything that determines a generated dataset (all fields are primitives).

    Attributes:
        image_size: side of the square images, in pixels (>= 32).
        num_classes: number of shape classes, the first ``num_classes`` of CLASS_NAMES (2..8).
        num_train, num_val, num_test: images per split.
        seed: master seed; each split derives its own independent seed from it.
        rotation_degrees: objects are rotated uniformly in [-r, r] degrees.
        min_radius, max_radius: object radius range, as a fraction of ``image_size``.
        min_contrast: minimum RGB distance (in [0, 1] units) between the object colour and the
            mean background colour under the object.
        num_lines: random distractor lines per image.
        num_blobs: soft distractor blobs per image.
        noise_std: standard deviation of the additive (uniform) pixel noise, in [0, 1] units.
        objects_per_image: 1, or 2 (two objects of different classes in every image, each with
            its own mask).
    """

    image_size: int = 64
    num_classes: int = 8
    num_train: int = 8000
    num_val: int = 1000
    num_test: int = 1000
    seed: int = 0
    rotation_degrees: float = 10.0
    min_radius: float = 0.12
    max_radius: float = 0.24
    min_contrast: float = 0.45
    num_lines: int = 3
    num_blobs: int = 3
    noise_std: float = 0.03
    objects_per_image: int = 1

    def __post_init__(self) -> None:
        _validate_spec(self)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict of primitives (JSON- and Hydra-friendly). Fields added after
        datasets were first cached are left out at their defaults, so that the cache keys of
        existing datasets and of the classifiers trained on them, and the recipes stored in
        checkpoints, stay what they were."""
        values = dataclasses.asdict(self)
        for name, default in _LATER_FIELD_DEFAULTS.items():
            if values[name] == default:
                del values[name]
        return values

    def cache_key(self) -> str:
        """A short stable hash (12 hex digits) of all fields and :data:`GENERATOR_VERSION`."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **self.to_dict()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def split_size(self, split: str) -> int:
        """Number of images in ``split`` ("train", "val" or "test")."""
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    @classmethod
    def from_config(cls, config: GeneratedShapesSpec | Mapping[str, Any]) -> GeneratedShapesSpec:
        """Build a spec from a spec, a dict or an OmegaConf DictConfig of spec fields.

        Raises:
            ValueError: on unknown field names or invalid values.
        """
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"expected a GeneratedShapesSpec or a mapping, got {type(config)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {str(k): v for k, v in config.items()}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"unknown generated-dataset field(s) {unknown}; known: {sorted(fields)}"
            )
        return cls(**values)


# fields added after the first datasets were cached, with the default that leaves them out of
# to_dict() (and so of every cache key)
_LATER_FIELD_DEFAULTS: dict[str, Any] = {"objects_per_image": 1}
#: objects per image that the generator supports
OBJECT_COUNTS = (1, 2)


def _validate_spec(spec: GeneratedShapesSpec) -> None:
    """Raise a ValueError describing the first invalid field of ``spec``."""
    int_fields = ("image_size", "num_classes", "num_train", "num_val", "num_test", "seed",
                  "num_lines", "num_blobs", "objects_per_image")
    for name in int_fields:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"generated dataset: {name} must be an int, got {value!r}")
    if spec.image_size < 32:
        raise ValueError(f"generated dataset: image_size must be >= 32, got {spec.image_size}")
    if not 2 <= spec.num_classes <= len(CLASS_NAMES):
        raise ValueError(
            f"generated dataset: num_classes must be in 2..{len(CLASS_NAMES)}, "
            f"got {spec.num_classes}"
        )
    for name in ("num_train", "num_val", "num_test", "num_lines", "num_blobs"):
        if getattr(spec, name) < 0:
            raise ValueError(f"generated dataset: {name} must be >= 0, got {getattr(spec, name)}")
    if not 0.0 <= spec.rotation_degrees <= 180.0:
        raise ValueError(
            f"generated dataset: rotation_degrees must be in [0, 180], got {spec.rotation_degrees}"
        )
    if not 0.03 <= spec.min_radius <= spec.max_radius <= 0.4:
        raise ValueError(
            "generated dataset: need 0.03 <= min_radius <= max_radius <= 0.4, got "
            f"min_radius={spec.min_radius}, max_radius={spec.max_radius}"
        )
    if not 0.0 <= spec.min_contrast <= 1.0:
        raise ValueError(
            f"generated dataset: min_contrast must be in [0, 1], got {spec.min_contrast}"
        )
    if not 0.0 <= spec.noise_std <= 0.5:
        raise ValueError(f"generated dataset: noise_std must be in [0, 0.5], got {spec.noise_std}")
    if spec.objects_per_image not in OBJECT_COUNTS:
        raise ValueError(f"generated dataset: objects_per_image must be one of {OBJECT_COUNTS}, "
                         f"got {spec.objects_per_image}")


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """One split: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,), ``masks`` bool (N, H, W).

    Two-object splits also hold ``object_labels`` int64 (N, 2) (distinct classes; ``labels`` is
    the first column) and ``object_masks`` bool (N, 2, H, W) (disjoint; ``masks`` is their union).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    object_labels: Tensor | None = None
    object_masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class GeneratedSplits:
    """The three splits of one generated dataset and the spec that made them."""

    spec: GeneratedShapesSpec
    train: SplitData
    val: SplitData
    test: SplitData

    def __getitem__(self, split: str) -> SplitData:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; choose one of {SPLITS}")
        return getattr(self, split)


def split_seed(seed: int, split: str) -> int:
    """An independent 62-bit seed for ``split`` derived from the master ``seed``."""
    digest = hashlib.sha256(f"ptame-generated-shapes:{seed}:{split}".encode()).hexdigest()
    return int(digest[:15], 16)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _upsample_matrix(cells: int, size: int) -> Tensor:
    """(size, cells) matrix of 1-D linear interpolation (as bilinear, align_corners=False)."""
    eye = torch.eye(cells, dtype=torch.float32)[None]  # (1, cells, cells)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T


def _smooth_noise(gen: torch.Generator, n: int, cells: int, size: int) -> Tensor:
    """Uniform noise on a ``cells`` x ``cells`` grid, bilinearly upsampled: (n, 3, S, S).

    The upsampling is done separably with matrix products (much faster than F.interpolate).
    """
    coarse = torch.rand((n, 3, cells, cells), generator=gen)
    matrix = _upsample_matrix(cells, size)
    return matrix @ coarse @ matrix.T


def _background(gen: torch.Generator, spec: GeneratedShapesSpec, n: int) -> Tensor:
    """Cluttered backgrounds, float (n, 3, S, S) in [0, 1] (before pixel noise).

    A random base colour plus smooth colour noise (4x4 and 8x8 grids, bilinearly upsampled),
    then soft blobs and thin lines of random colours.
    """
    s = spec.image_size
    base = _uniform(gen, (n, 3, 1, 1), 0.15, 0.85)
    image = base + 0.35 * (_smooth_noise(gen, n, 4, s) - 0.5)
    image = image.add_(_smooth_noise(gen, n, 8, s).sub_(0.5).mul_(0.15))
    coords = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres, in pixels
    image = _paint_blobs(gen, spec, image, coords)
    image = _paint_lines(gen, spec, image, coords)
    return image.clamp_(0.0, 1.0)


def _pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (y, x), each (1, 1, S, S), in pixels."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy[None, None], xx[None, None]


def _paint_blobs(gen: torch.Generator, spec: GeneratedShapesSpec, image: Tensor,
                 coords: Tensor) -> Tensor:
    """Blend ``num_blobs`` soft Gaussian blobs of random colour into ``image`` (n, 3, S, S).

    ``coords`` (S,) are the pixel-centre coordinates; the Gaussians are built separably.
    """
    n, k, s = image.shape[0], spec.num_blobs, spec.image_size
    if k == 0:
        return image
    centre = _uniform(gen, (n, k, 2, 1), 0.0, s)
    sigma = _uniform(gen, (n, k, 1, 1), 0.05 * s, 0.12 * s)
    alpha = _uniform(gen, (n, k, 1, 1), 0.3, 0.7)
    colour = torch.rand((n, k, 3, 1, 1), generator=gen)
    profile = torch.exp(-((coords - centre) ** 2) / (2 * sigma**2))  # (n, k, 2, S)
    weight = alpha * profile[:, :, 0, :, None] * profile[:, :, 1, None, :]  # (n, k, S, S)
    for j in range(k):
        image = torch.lerp(image, colour[:, j], weight[:, j, None])
    return image


def _paint_lines(gen: torch.Generator, spec: GeneratedShapesSpec, image: Tensor,
                 coords: Tensor) -> Tensor:
    """Blend ``num_lines`` random straight lines (about 1-2 px wide, anti-aliased, opacity
    0.35-0.75) into ``image`` (n, 3, S, S).

    Each line crosses the image through a random point at a random angle.
    """
    n, k, s = image.shape[0], spec.num_lines, spec.image_size
    if k == 0:
        return image
    angle = _uniform(gen, (n, k, 1, 1), 0.0, math.pi)
    point = _uniform(gen, (n, k, 2, 1, 1), 0.0, s)
    half_width = _uniform(gen, (n, k, 1, 1), 0.4, 0.9) * (s / 64) ** 0.5
    opacity = _uniform(gen, (n, k, 1, 1), 0.35, 0.75)
    colour = torch.rand((n, k, 3, 1, 1), generator=gen)
    ny, nx = torch.sin(angle), torch.cos(angle)
    offset = point[:, :, 0] * ny + point[:, :, 1] * nx
    distance = (coords[:, None] * ny + coords[None, :] * nx - offset).abs_()  # (n, k, S, S)
    coverage = (half_width + 0.5 - distance).clamp_(0.0, 1.0).mul_(opacity)
    for j in range(k):
        image = torch.lerp(image, colour[:, j], coverage[:, j, None])
    return image


def _shape_masks(labels: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Inside-tests of each image's shape in object coordinates.

    Args:
        labels: int64 (n,), class indices into CLASS_NAMES.
        u, v: float (n, S, S), pixel centres in object coordinates (unit = object radius;
            v points down in the image).

    Returns:
        bool (n, S, S), True on the object's pixels.
    """
    masks = torch.zeros_like(u, dtype=torch.bool)
    for index, name in enumerate(CLASS_NAMES):
        chosen = (labels == index).nonzero().squeeze(1)
        if chosen.numel() > 0:
            masks[chosen] = _SHAPES[name](u[chosen], v[chosen])
    return masks


def _circle(u: Tensor, v: Tensor) -> Tensor:
    return u**2 + v**2 <= 1.0


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.78


def _plus(u: Tensor, v: Tensor) -> Tensor:
    au, av = u.abs(), v.abs()
    return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))


def _ring(u: Tensor, v: Tensor) -> Tensor:
    rho2 = u**2 + v**2
    return (rho2 <= 1.0) & (rho2 >= 0.55**2)


def _diamond(u: Tensor, v: Tensor) -> Tensor:
    return u.abs() / 0.7 + v.abs() / 1.05 <= 1.0


def _crescent(u: Tensor, v: Tensor) -> Tensor:
    return (u**2 + v**2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 >= 0.78**2)


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral triangle pointing up, circumradius 1.1 (inradius 0.55)."""
    inside = torch.ones_like(u, dtype=torch.bool)
    for angle in (90.0, 210.0, 330.0):  # outward normals of the three edges (v points down)
        a = math.radians(angle)
        inside &= u * math.cos(a) + v * math.sin(a) <= 0.55
    return inside


def _star(u: Tensor, v: Tensor) -> Tensor:
    """Five-pointed star pointing up, outer radius 1.1, inner radius 0.5."""
    rho = torch.sqrt(u**2 + v**2)
    phi = torch.atan2(u, -v)  # 0 at "up", in (-pi, pi]
    sector = 2 * math.pi / 5
    a = torch.remainder(phi + sector / 2, sector) - sector / 2  # angle from nearest tip
    a = a.abs()
    outer, inner = 1.1, 0.5
    # Edge from the tip (outer, 0) to the inner vertex (inner cos 36, inner sin 36).
    tip_x, tip_y = outer, 0.0
    in_x, in_y = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    px, py = rho * torch.cos(a), rho * torch.sin(a)
    cross = (in_x - tip_x) * (py - tip_y) - (in_y - tip_y) * (px - tip_x)
    return cross >= 0.0  # the origin lies on the cross >= 0 side


_SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "plus": _plus,
    "ring": _ring,
    "star": _star,
    "diamond": _diamond,
    "crescent": _crescent,
}


def _place_objects(gen: torch.Generator, spec: GeneratedShapesSpec, n: int) -> Tensor:
    """Random geometry per image: (n, 4) = centre y, centre x, radius (pixels), angle (rad)."""
    s = spec.image_size
    radius = _uniform(gen, (n,), spec.min_radius * s, spec.max_radius * s)
    margin = _SHAPE_EXTENT * radius + 1.0
    cy = margin + torch.rand((n,), generator=gen) * (s - 2 * margin)
    cx = margin + torch.rand((n,), generator=gen) * (s - 2 * margin)
    angle = torch.deg2rad(_uniform(gen, (n,), -spec.rotation_degrees, spec.rotation_degrees))
    return torch.stack([cy, cx, radius, angle], dim=1)


def _object_coordinates(geometry: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pixel centres in each object's rotated, radius-scaled frame: u, v each (n, S, S)."""
    yy, xx = _pixel_grid(size)
    cy, cx, radius, angle = (geometry[:, i, None, None] for i in range(4))
    dy, dx = yy[0] - cy, xx[0] - cx
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (dx * cos + dy * sin) / radius
    v = (-dx * sin + dy * cos) / radius
    return u, v


def _place_pairs(gen: torch.Generator, spec: GeneratedShapesSpec, n: int,
                 candidates: int = 64, attempts: int = 100) -> Tensor:
    """Geometry of two objects per image, (n, 2, 4) as in :func:`_place_objects`, whose shapes
    cannot touch: the distance of the centres exceeds the sum of the shapes' extents (1.1 radii
    each) by at least 2 px. The second object is the first of ``candidates`` random placements
    that fits; the images where none fits are drawn again (both objects), so every object keeps
    the one-object size distribution conditioned on the pair fitting.

    Raises:
        ValueError: no pair fits after ``attempts`` draws (radii too large for the image).
    """
    geometry = torch.empty((n, 2, 4))
    pending = torch.arange(n)
    for _ in range(attempts):
        count = pending.numel()
        first = _place_objects(gen, spec, count)
        second = _place_objects(gen, spec, count * candidates).view(count, candidates, 4)
        distance = (second[..., :2] - first[:, None, :2]).norm(dim=2)
        fits = distance >= _SHAPE_EXTENT * (first[:, None, 2] + second[..., 2]) + 2.0
        placed = fits.any(dim=1)
        chosen = second[torch.arange(count), fits.float().argmax(dim=1)]
        geometry[pending[placed], 0] = first[placed]
        geometry[pending[placed], 1] = chosen[placed]
        pending = pending[~placed]
        if pending.numel() == 0:
            return geometry
    raise ValueError(f"generated dataset: could not place two objects apart in {spec.image_size} px "
                     f"images with max_radius={spec.max_radius}; lower max_radius or use objects_per_image=1")


def _contrasting_colours(gen: torch.Generator, under: Tensor, min_contrast: float) -> Tensor:
    """Random object colours far enough from the background colour ``under`` (n, 3).

    Draws 8 candidate colours per image and keeps the first one at RGB distance >= min_contrast,
    or the farthest candidate when none is (then pushes it away from ``under``).
    """
    n = under.shape[0]
    candidates = torch.rand((n, 8, 3), generator=gen)
    distance = (candidates - under[:, None]).norm(dim=2)  # (n, 8)
    ok = distance >= min_contrast
    first_ok = torch.where(ok.any(1), ok.float().argmax(1), distance.argmax(1))
    colour = candidates[torch.arange(n), first_ok]
    # Fallback: push colours that are still too close directly away from the background.
    gap = colour - under
    norm = gap.norm(dim=1, keepdim=True).clamp_min(1e-6)
    too_close = norm < min_contrast
    pushed = torch.where(under > 0.5, under - min_contrast, under + min_contrast).clamp(0, 1)
    return torch.where(too_close, pushed, colour)


def _paint_object(gen: torch.Generator, spec: GeneratedShapesSpec, image: Tensor, masks: Tensor) -> Tensor:
    """``image`` (n, 3, S, S) with the pixels of ``masks`` (n, S, S) in one random colour per
    image that contrasts with the mean background colour under the object."""
    area = masks.sum(dim=(1, 2)).clamp_min(1).float()
    under = (image * masks[:, None]).sum(dim=(2, 3)) / area[:, None]  # (n, 3)
    colour = _contrasting_colours(gen, under, spec.min_contrast)
    return torch.where(masks[:, None], colour[:, :, None, None], image)


def _noisy_uint8(gen: torch.Generator, spec: GeneratedShapesSpec, image: Tensor) -> Tensor:
    """``image`` float (n, 3, S, S) plus uniform pixel noise of standard deviation ``noise_std``
    (cheaper than Gaussian), clamped and rounded to uint8."""
    noise = torch.rand(image.shape, generator=gen).sub_(0.5).mul_(spec.noise_std * math.sqrt(12))
    return (image.add_(noise).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _generate_chunk(gen: torch.Generator, spec: GeneratedShapesSpec,
                    labels: Tensor) -> tuple[Tensor, Tensor]:
    """Images uint8 (n, 3, S, S) and masks bool (n, S, S) for the given labels (n,)."""
    n, s = labels.shape[0], spec.image_size
    image = _background(gen, spec, n)
    geometry = _place_objects(gen, spec, n)
    masks = _shape_masks(labels, *_object_coordinates(geometry, s))
    return _noisy_uint8(gen, spec, _paint_object(gen, spec, image, masks)), masks


def _generate_pair_chunk(gen: torch.Generator, spec: GeneratedShapesSpec,
                         labels: Tensor) -> tuple[Tensor, Tensor]:
    """Images uint8 (n, 3, S, S) and object masks bool (n, 2, S, S) for object labels (n, 2):
    each object painted as in :func:`_generate_chunk`."""
    n, s = labels.shape[0], spec.image_size
    image = _background(gen, spec, n)
    geometry = _place_pairs(gen, spec, n)
    masks = torch.stack([_shape_masks(labels[:, k], *_object_coordinates(geometry[:, k], s))
                         for k in range(2)], dim=1)
    for k in range(2):
        image = _paint_object(gen, spec, image, masks[:, k])
    return _noisy_uint8(gen, spec, image), masks


def _generate_pair_split(spec: GeneratedShapesSpec, n: int, gen: torch.Generator) -> SplitData:
    """A two-object split of ``n`` images: the first object's classes balanced and shuffled, the
    second's uniform over the other classes."""
    s = spec.image_size
    first = (torch.arange(n) % spec.num_classes)[torch.randperm(n, generator=gen)]
    offset = torch.randint(1, spec.num_classes, (n,), generator=gen)
    object_labels = torch.stack([first, (first + offset) % spec.num_classes], dim=1)
    images = torch.empty((n, 3, s, s), dtype=torch.uint8)
    object_masks = torch.empty((n, 2, s, s), dtype=torch.bool)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        images[start:stop], object_masks[start:stop] = _generate_pair_chunk(gen, spec, object_labels[start:stop])
    return SplitData(images=images, labels=object_labels[:, 0].clone(), masks=object_masks.any(dim=1),
                     object_labels=object_labels, object_masks=object_masks)


def generate_split(spec: GeneratedShapesSpec, split: str) -> SplitData:
    """Generate one split of ``spec`` deterministically (CPU, vectorised in chunks).

    Labels are balanced: ``arange(N) % num_classes``, shuffled with the split's generator. With
    ``objects_per_image=2`` every image holds two objects (:func:`_generate_pair_split`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    n, s = spec.split_size(split), spec.image_size
    gen = torch.Generator().manual_seed(split_seed(spec.seed, split))
    if spec.objects_per_image == 2:
        return _generate_pair_split(spec, n, gen)
    labels = (torch.arange(n) % spec.num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty((n, 3, s, s), dtype=torch.uint8)
    masks = torch.empty((n, s, s), dtype=torch.bool)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        images[start:stop], masks[start:stop] = _generate_chunk(gen, spec, labels[start:stop])
    return SplitData(images=images, labels=labels.to(torch.int64), masks=masks)


def generate(spec: GeneratedShapesSpec) -> GeneratedSplits:
    """Generate all three splits of ``spec`` (no caching)."""
    return GeneratedSplits(spec=spec, **{split: generate_split(spec, split) for split in SPLITS})


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_path(spec: GeneratedShapesSpec, cache_dir: str | os.PathLike[str]) -> Path:
    """Where :func:`load_or_generate` caches ``spec``: ``cache_dir/generated/shapes-<key>.pt``."""
    return Path(cache_dir).expanduser() / "generated" / f"shapes-{spec.cache_key()}.pt"


def _to_payload(splits: GeneratedSplits) -> dict[str, Any]:
    payload: dict[str, Any] = {"generator_version": GENERATOR_VERSION,
                               "spec": splits.spec.to_dict()}
    for split in SPLITS:
        data = splits[split]
        payload[split] = {"images": data.images, "labels": data.labels, "masks": data.masks}
        if data.object_labels is not None:
            payload[split].update(object_labels=data.object_labels, object_masks=data.object_masks)
    return payload


def _from_payload(payload: Any, spec: GeneratedShapesSpec) -> GeneratedSplits:
    """Rebuild splits from a loaded cache file; raise ValueError if it does not match ``spec``."""
    if not isinstance(payload, dict) or payload.get("spec") != spec.to_dict():
        raise ValueError("cache file does not hold this spec")
    if payload.get("generator_version") != GENERATOR_VERSION:
        raise ValueError("cache file was written by another generator version")
    s = spec.image_size
    splits = {}
    for split in SPLITS:
        part, n = payload[split], spec.split_size(split)
        data = SplitData(images=part["images"], labels=part["labels"], masks=part["masks"],
                         object_labels=part.get("object_labels"), object_masks=part.get("object_masks"))
        expected = {"images": ((n, 3, s, s), torch.uint8), "labels": ((n,), torch.int64),
                    "masks": ((n, s, s), torch.bool)}
        if spec.objects_per_image == 2:
            expected.update(object_labels=((n, 2), torch.int64), object_masks=((n, 2, s, s), torch.bool))
        for name, (shape, dtype) in expected.items():
            tensor = getattr(data, name)
            if (not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape
                    or tensor.dtype != dtype):
                raise ValueError(f"cache file has a malformed {split}/{name} tensor")
        splits[split] = data
    return GeneratedSplits(spec=spec, **splits)


def load_or_generate(
    spec: GeneratedShapesSpec, cache_dir: str | os.PathLike[str]
) -> GeneratedSplits:
    """Load the splits of ``spec`` from ``cache_dir``, generating and caching them if needed.

    The cache file is ``cache_dir/generated/shapes-<spec.cache_key()>.pt``, written atomically
    and read with ``torch.load(weights_only=True)``. A corrupt or mismatching file is
    regenerated with a warning.

    Returns:
        GeneratedSplits with, per split, images uint8 (N, 3, H, W), labels int64 (N,) and
        masks bool (N, H, W).
    """
    path = cache_path(spec, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer at a time: DDP ranks or parallel sweep trials wait for the first to finish.
    with FileLock(f"{path}.lock"):
        return _load_or_generate_unlocked(spec, path)


def _load_or_generate_unlocked(spec: GeneratedShapesSpec, path: Path) -> GeneratedSplits:
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return _from_payload(payload, spec)
        except Exception as error:  # noqa: BLE001 - any unreadable cache is regenerated
            warnings.warn(
                f"generated dataset cache {path} is unreadable ({error}); regenerating it",
                RuntimeWarning,
                stacklevel=2,
            )
    log.info("generating dataset %s into %s", spec, path)
    splits = generate(spec)
    torch_save_atomic(_to_payload(splits), path)
    return splits


# --------------------------------------------------------------------------------------------
# Dataset and data module
# --------------------------------------------------------------------------------------------


class GeneratedShapesDataset(Dataset):
    """One split as a map-style dataset of dict items.

    ``dataset[i]`` is ``{"image": float32 (3, H, W) in [0, 1], "label": int64 scalar,
    "mask": bool (H, W), "index": int64 scalar equal to i}``, plus ``"object_labels"`` int64 (2,)
    and ``"object_masks"`` bool (2, H, W) on a two-object split.
    """

    def __init__(self, split: SplitData) -> None:
        n = len(split)
        if split.images.shape[0] != n or split.masks.shape[0] != n:
            raise ValueError("images, labels and masks must have the same length")
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        item = {
            "image": self.split.images[index].to(torch.float32).div_(255.0),
            "label": self.split.labels[index].clone(),
            "mask": self.split.masks[index].clone(),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.split.object_labels is not None and self.split.object_masks is not None:
            item["object_labels"] = self.split.object_labels[index].clone()
            item["object_masks"] = self.split.object_masks[index].clone()
        return item


class GeneratedShapesDataModule(lightning.LightningDataModule):
    """Lightning data module over a cached :class:`GeneratedShapesSpec` dataset.

    Args:
        cache_dir: root of the cache (the data lives in ``cache_dir/generated``).
        image_size, num_classes, num_train, num_val, num_test, seed: spec fields.
        batch_size: training batch size (shuffled with a generator seeded by ``seed``,
            incomplete last batch dropped).
        eval_batch_size: validation/test batch size (not shuffled).
        num_workers: DataLoader worker processes.
        **spec_fields: any other :class:`GeneratedShapesSpec` field (e.g. ``rotation_degrees``).

    Raises:
        ValueError: on invalid spec values, batch sizes, worker count, or unknown fields.
    """

    has_masks = True

    def __init__(
        self,
        cache_dir: str,
        image_size: int = 64,
        num_classes: int = 8,
        num_train: int = 8000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        **spec_fields: Any,
    ) -> None:
        super().__init__()
        self.spec = GeneratedShapesSpec.from_config(
            dict(image_size=image_size, num_classes=num_classes, num_train=num_train,
                 num_val=num_val, num_test=num_test, seed=seed, **spec_fields)
        )
        for name, value, low in (("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"generated data module: {name} must be an int >= {low}, "
                                 f"got {value!r}")
        if num_train < batch_size:
            raise ValueError(
                f"generated data module: num_train ({num_train}) must be >= batch_size "
                f"({batch_size}) since the last incomplete training batch is dropped"
            )
        self.cache_dir = str(cache_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.num_classes = self.spec.num_classes
        self.resume_position: dict[str, int] | None = None  # from a checkpoint (load_state_dict)
        self.class_names: tuple[str, ...] = CLASS_NAMES[: self.num_classes]
        self.image_size = self.spec.image_size
        #: items carry object_labels / object_masks (class-specific localisation)
        self.has_object_masks = self.spec.objects_per_image > 1
        self._splits: GeneratedSplits | None = None

    def prepare_data(self) -> None:
        """Generate and cache the dataset if it is not cached yet."""
        self._splits = load_or_generate(self.spec, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached splits (generating them if needed)."""
        if self._splits is None:
            self._splits = load_or_generate(self.spec, self.cache_dir)

    @property
    def splits(self) -> GeneratedSplits:
        """The loaded splits (loads them on first access)."""
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return self._splits

    def dataset(self, split: str) -> GeneratedShapesDataset:
        """The :class:`GeneratedShapesDataset` of ``split`` ("train", "val" or "test")."""
        return GeneratedShapesDataset(self.splits[split])

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where training stands in its data (:func:`training_position`)."""
        position = training_position(self.trainer)
        return {"train_position": position} if position is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restored before the training loader is built: a resumed run continues the data order."""
        self.resume_position = state.get("train_position")

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order of ``shuffle=True`` with a generator seeded by
        the dataset's seed, epoch by epoch), resumable mid-epoch (:mod:`ptame.data.resumable`)."""
        dataset = self.dataset("train")
        sampler = EpochOrderSampler(len(dataset), self.spec.seed)
        resume_sampler(sampler, self, self.batch_size)
        return ResumableLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

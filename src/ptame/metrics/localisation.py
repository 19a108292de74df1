"""Localisation against ground-truth object masks: pointing game and energy-based pointing game.

Both are averaged per image over all images seen; values are kept per dataset index, so the
duplicates a DistributedSampler pads in are counted once and 1 or N processes agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ptame.metrics.base import PerImageMetric


def _check(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"expected maps and masks of the same shape (B, H, W), got {tuple(maps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if not torch.isfinite(maps).all():
        raise ValueError("saliency maps contain NaN or infinite values")


# TorchRay's pointing-game benchmark (the reference implementation of Zhang et al.'s protocol)
# tests the point at the dataset's native resolution with a 15 px tolerance: PASCAL VOC 2007
# images are at most 500 px on their long side, COCO images 640 px.
REFERENCE_TOLERANCE_PX = 15.0
REFERENCE_IMAGE_SIDE_PX = 500.0


def scaled_pointing_tolerance(image_side: int) -> float:
    """TorchRay's 15 px tolerance at PASCAL VOC resolution (500 px), scaled to ``image_side``.

    Args:
        image_side: the long side of the evaluated maps, in pixels.

    Returns:
        the tolerance in pixels (1.92 at 64 px, 6.72 at 224 px, 15.0 at 500 px).
    """
    if image_side <= 0:
        raise ValueError(f"image side must be positive, got {image_side}")
    return REFERENCE_TOLERANCE_PX * image_side / REFERENCE_IMAGE_SIDE_PX


def check_pointing_tolerance(tolerance: float) -> float:
    """``tolerance`` as a float; ValueError unless it is a finite number of pixels >= 0."""
    try:
        tolerance = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"pointing-game tolerance must be a number of pixels, got {tolerance!r}") from None
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"pointing-game tolerance must be a finite number of pixels >= 0, got {tolerance}")
    return tolerance


def dilate_masks(masks: Tensor, radius: float) -> Tensor:
    """(B, H, W) bool masks grown by every pixel at Euclidean distance < ``radius`` (pixels).

    The strict inequality is TorchRay's acceptance region (``du**2 + dv**2 < tolerance**2``);
    ``radius`` 0 returns the masks unchanged (so radius 0 and radius 1 give the same masks).
    """
    radius = check_pointing_tolerance(radius)
    reach = math.ceil(radius) - 1  # the largest integer offset below radius (-1 for radius 0)
    if reach <= 0:
        return masks.bool()
    offsets = torch.arange(-reach, reach + 1, device=masks.device, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 < radius**2).float()
    grown = torch.nn.functional.conv2d(masks[:, None].float(), disk[None, None], padding=reach)
    return grown[:, 0] > 0.5


def pointing_hits(maps: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    """(B,) pointing-game score per image: 1.0 if the map's maximum pixel hits the object.

    A hit, as in Zhang et al.'s protocol and TorchRay's implementation of it: some object pixel
    lies at Euclidean distance < ``tolerance`` (pixels) from the maximum. ``tolerance`` 0 is the
    strict game: the maximum itself must be an object pixel. When several pixels share the
    maximum (e.g. a saturated sigmoid), the score is the fraction of them that hit: the expected
    hit of a uniformly random tie-break. A constant map therefore scores the (grown) object's
    area fraction, like a random guess, never a lucky 1.
    """
    _check(maps, masks)
    flat_maps = maps.flatten(1)
    flat_masks = dilate_masks(masks.bool(), tolerance).flatten(1)
    is_max = flat_maps == flat_maps.amax(dim=1, keepdim=True)
    return (is_max & flat_masks).sum(dim=1).float() / is_max.sum(dim=1).float()


def energy_shares(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) share of each map's total mass that lies inside the object mask, in [0, 1].

    An all-zero map has no mass and scores 0.
    """
    _check(maps, masks)
    maps = maps.clamp_min(0).flatten(1).double()
    inside = (maps * masks.flatten(1).double()).sum(dim=1)
    total = maps.sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)).float()


class _LocalisationMetric(PerImageMetric):
    """Mean of a per-image localisation score; duplicates (same dataset index) count once."""

    higher_is_better = True

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, maps: Tensor, masks: Tensor, indices: Tensor | None = None) -> None:
        """Add a batch: maps (B, H, W) saliency, masks (B, H, W) bool object masks, indices (B,)
        dataset indices (None numbers the images seen so far 0, 1, ... on this process)."""
        if maps.shape[0] == 0:
            return
        scores = self.score(maps, masks)
        if indices is None:
            offset = sum(int(i.numel()) for i in self.indices) if isinstance(self.indices, list) else 0
            indices = torch.arange(offset, offset + scores.numel(), device=scores.device)
        self._record(torch.as_tensor(indices, device=scores.device).view(-1), scores)

    def per_image_figures(self) -> Tensor:
        """The score of each image (N,)."""
        return self.per_image()[1]

    def compute(self) -> Tensor:
        _, values = self.per_image()
        return values.mean().float()


class PointingGame(_LocalisationMetric):
    """Fraction of images whose map maximum hits the object (see :func:`pointing_hits`).

    Args:
        tolerance: pixels; a maximum at distance < tolerance from the object also counts
            (TorchRay's convention; 0 = strict, the maximum must lie on the object).
    """

    directions = {"pointing_game": "max", "pointing_game_strict": "max"}

    def __init__(self, tolerance: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = check_pointing_tolerance(tolerance)

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return pointing_hits(maps, masks, self.tolerance)


class EnergyPointingGame(_LocalisationMetric):
    """Mean share of map mass inside the object (see :func:`energy_shares`)."""

    directions = {"energy_pointing_game": "max"}

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return energy_shares(maps, masks)


#: the figures of :class:`ClassSpecificLocalisation`, in the column order of its values
CLASS_SPECIFIC_KEYS = ("class_pointing_game", "class_pointing_game_other",
                       "class_energy_pointing_game", "class_energy_pointing_game_other")


class ClassSpecificLocalisation(PerImageMetric):
    """Localisation of class-specific maps on images with several objects of different classes.

    For each object of an image, its class is explained and the map is scored against that
    object's mask (``class_pointing_game``, ``class_energy_pointing_game``: high is good) and
    against the union of the other objects' masks (``..._other``: low is good, a map of one
    class should not sit on an object of another). The pointing game uses the tolerance rule of
    :class:`PointingGame`. An image's value is the mean over its objects; figures are means over
    images, so an image counts once whatever its number of objects.

    Args:
        tolerance: pixels (see :func:`pointing_hits`).
    """

    directions = {"class_pointing_game": "max", "class_pointing_game_other": "min",
                  "class_energy_pointing_game": "max", "class_energy_pointing_game_other": "min"}

    def __init__(self, tolerance: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = check_pointing_tolerance(tolerance)

    def update(self, explain: Callable[[Tensor], Tensor], object_labels: Tensor, object_masks: Tensor,
               indices: Tensor) -> None:
        """Add a batch.

        Args:
            explain: targets (B,) -> maps (B, H, W) of those classes for the batch's images.
            object_labels: (B, K) class of each object, K >= 2.
            object_masks: (B, K, H, W) bool mask of each object.
            indices: (B,) dataset indices.
        """
        if object_labels.ndim != 2 or object_labels.shape[1] < 2 or object_masks.shape[:2] != object_labels.shape:
            raise ValueError(f"class-specific localisation needs object_labels (B, K >= 2) and object_masks "
                             f"(B, K, H, W), got {tuple(object_labels.shape)} and {tuple(object_masks.shape)}")
        if object_labels.shape[0] == 0:
            return
        masks = object_masks.bool()
        objects = object_labels.shape[1]
        scores = []
        for k in range(objects):
            maps = explain(object_labels[:, k])
            own = masks[:, k]
            others = masks[:, [j for j in range(objects) if j != k]].any(dim=1)
            scores.append(torch.stack([
                pointing_hits(maps, own, self.tolerance), pointing_hits(maps, others, self.tolerance),
                energy_shares(maps, own), energy_shares(maps, others)], dim=1))
        self._record(torch.as_tensor(indices, device=maps.device).view(-1), torch.stack(scores).mean(dim=0))

    def per_image_figures(self) -> dict[str, Tensor]:
        """Each figure per image (N,), the mean over the image's objects."""
        values = self.per_image()[1]
        return {key: values[:, column] for column, key in enumerate(CLASS_SPECIFIC_KEYS)}

    def compute(self) -> dict[str, Tensor]:
        return {key: values.mean().float() for key, values in self.per_image_figures().items()}

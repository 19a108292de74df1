"""Localisation against ground-truth object masks: pointing game and energy-based pointing game.

Both are averaged per image over all images seen; values are kept per dataset index, so the
duplicates a DistributedSampler pads in are counted once and 1 or N processes agree.
"""

from __future__ import annotations

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


def dilate_masks(masks: Tensor, radius: int) -> Tensor:
    """(B, H, W) bool masks grown by every pixel within Euclidean distance ``radius`` (pixels)."""
    if radius < 0:
        raise ValueError(f"pointing-game tolerance must be >= 0 pixels, got {radius}")
    if radius == 0:
        return masks.bool()
    offsets = torch.arange(-radius, radius + 1, device=masks.device, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()
    grown = torch.nn.functional.conv2d(
        masks[:, None].float(), disk[None, None], padding=radius
    )
    return grown[:, 0] > 0.5


def pointing_hits(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """(B,) pointing-game score per image: 1.0 if the map's maximum pixel lies in the object.

    When several pixels share the maximum (e.g. a saturated sigmoid), the score is the fraction
    of them inside the object: the expected hit of a uniformly random tie-break. A constant map
    therefore scores the object's area fraction, like a random guess, never a lucky 1.

    ``tolerance`` (pixels, default 0 = strict) also counts a maximum within that Euclidean
    distance of the object as a hit: the protocol of Zhang et al. (2018), who use 15 px at 224 px.
    """
    _check(maps, masks)
    flat_maps = maps.flatten(1)
    flat_masks = dilate_masks(masks.bool(), int(tolerance)).flatten(1)
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
        scores = self.score(maps, masks)
        if indices is None:
            offset = sum(int(i.numel()) for i in self.indices) if isinstance(self.indices, list) else 0
            indices = torch.arange(offset, offset + scores.numel(), device=scores.device)
        self._record(torch.as_tensor(indices, device=scores.device).view(-1), scores)

    def compute(self) -> Tensor:
        _, values = self.per_image()
        return values.mean().float()


class PointingGame(_LocalisationMetric):
    """Fraction of images whose map maximum lies inside the object (see :func:`pointing_hits`).

    Args:
        tolerance: pixels; a maximum this close to the object also counts (0 = strict).
    """

    def __init__(self, tolerance: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(tolerance) != tolerance or tolerance < 0:
            raise ValueError(f"pointing-game tolerance must be an integer >= 0, got {tolerance}")
        self.tolerance = int(tolerance)

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return pointing_hits(maps, masks, self.tolerance)


class EnergyPointingGame(_LocalisationMetric):
    """Mean share of map mass inside the object (see :func:`energy_shares`)."""

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return energy_shares(maps, masks)

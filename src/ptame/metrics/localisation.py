"""Localisation against ground-truth object masks: pointing game and energy-based pointing game.

Both are averaged per image over all images seen; values are kept per dataset index, so the
duplicates a DistributedSampler pads in are counted once and 1 or N processes agree.
"""

from __future__ import annotations

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


def pointing_hits(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) pointing-game score per image: 1.0 if the map's maximum pixel lies in the object.

    When several pixels share the maximum (e.g. a saturated sigmoid), the score is the fraction
    of them inside the object: the expected hit of a uniformly random tie-break. A constant map
    therefore scores the object's area fraction, like a random guess, never a lucky 1.
    """
    _check(maps, masks)
    flat_maps = maps.flatten(1)
    flat_masks = masks.flatten(1).bool()
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
    """Fraction of images whose map maximum lies inside the object (see :func:`pointing_hits`)."""

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return pointing_hits(maps, masks)


class EnergyPointingGame(_LocalisationMetric):
    """Mean share of map mass inside the object (see :func:`energy_shares`)."""

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return energy_shares(maps, masks)

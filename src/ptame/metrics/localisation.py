"""Localisation against ground-truth object masks: pointing game and energy-based pointing game.

Both are averaged per image over all images seen (sums and counts are reduced across processes,
so 1 or N processes give the same number on the same images).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


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


class _PerImageMean(Metric):
    """Mean of a per-image score, reduced as (sum, count) across processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch: maps (B, H, W) saliency, masks (B, H, W) bool object masks."""
        scores = self.score(maps, masks)
        self.total += scores.double().sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update")
        return (self.total / self.count).float()


class PointingGame(_PerImageMean):
    """Fraction of images whose map maximum lies inside the object (see :func:`pointing_hits`)."""

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return pointing_hits(maps, masks)


class EnergyPointingGame(_PerImageMean):
    """Mean share of map mass inside the object (see :func:`energy_shares`)."""

    def score(self, maps: Tensor, masks: Tensor) -> Tensor:
        return energy_shares(maps, masks)

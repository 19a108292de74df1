"""Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++; P-TAME Eq. 5-6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ptame.metrics.base import (
    PIXEL_RULES,
    BackboneFn,
    PerImageMetric,
    check_batch,
    classify,
    original_logits,
    release_kept_pixels,
    top_pixels,
)


def _format_threshold(value: float) -> str:
    return f"{value:g}"


class AverageDropIncrease(PerImageMetric):
    """AD(v) = mean over images of max(0, p - p_m) / p and IC(v) = mean(p_m > p), in percent.

    p = softmax(f(x))[c*] on the [0, 1] image, c* = argmax f(x); p_m = softmax(f(x * M_v))[c*]
    where M_v keeps the top v% pixels of the map, with their map values (``soft=True``, as the
    authors' release does) or as ones (``soft=False``), and zeroes the others (black pixels).
    Averaged per image.

    Which pixels are kept (``pixels``): ``"exact"``: exactly round(v% * H * W) highest pixels,
    ties broken by seeded per-image keys (:func:`~ptame.metrics.base.top_pixels`);
    ``"release"``: the authors' released rule, every pixel strictly above the k-th smallest value,
    k = int(H W (1 - v%)) (:func:`~ptame.metrics.base.release_kept_pixels`).

    Args:
        backbone: frozen classifier taking [0, 1] images (normalises inside).
        thresholds: v values in percent.
        soft: keep map values (True) or a binary mask (False).
        pixels: ``"exact"`` or ``"release"``.
        seed: seed of the tie-breaking keys (``"exact"``).
    """

    higher_is_better = None
    takes_logits = True
    directions = {"AD@": "min", "IC@": "max"}

    def __init__(
        self, backbone: BackboneFn, thresholds: Sequence[float] = (100, 50, 15), soft: bool = True,
        pixels: str = "exact", seed: int = 0, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not thresholds or any(not 0 < v <= 100 for v in thresholds):
            raise ValueError(f"AD/IC thresholds must be percentages in (0, 100], got {list(thresholds)}")
        if pixels not in PIXEL_RULES:
            raise ValueError(f"AD/IC pixels must be one of {PIXEL_RULES}, got {pixels!r}")
        self.__dict__["backbone"] = backbone  # not a submodule: no weights in the metric state
        self.thresholds = [float(v) for v in thresholds]
        self.soft = bool(soft)
        self.pixels = pixels
        self.seed = int(seed)

    def kept(self, maps: Tensor, fraction: float, indices: Tensor) -> Tensor:
        """(B, H, W) bool: the pixels kept for ``fraction`` of each map (see ``pixels``)."""
        if self.pixels == "release":
            return release_kept_pixels(maps, fraction)
        return top_pixels(maps, fraction, indices, self.seed)

    @torch.no_grad()
    def update(self, images: Tensor, maps: Tensor, indices: Tensor | None = None,
               logits: Tensor | None = None) -> None:
        """images (B, 3, H, W) in [0, 1]; maps (B, H, W) in [0, 1] explaining c*; indices (B,);
        logits (B, C): the backbone's logits of the images if the caller has them."""
        images, maps, indices = check_batch(images, maps, indices, "AverageDropIncrease", maps_in_unit_range=self.soft)
        if images.shape[0] == 0:
            return
        logits = original_logits(self.backbone, images, logits, "AverageDropIncrease")
        probabilities = logits.float().softmax(dim=1)
        predictions = probabilities.argmax(dim=1, keepdim=True)
        original = probabilities.gather(1, predictions).squeeze(1)
        columns = []
        for threshold in self.thresholds:
            keep = self.kept(maps, threshold / 100, indices)
            mask = torch.where(keep, maps, torch.zeros_like(maps)) if self.soft else keep.to(maps.dtype)
            masked = classify(self.backbone, images * mask.unsqueeze(1).to(images.dtype)).float().softmax(dim=1)
            after = masked.gather(1, predictions).squeeze(1)
            drop = (original - after).clamp_min(0) / original.clamp_min(torch.finfo(original.dtype).tiny)
            columns += [drop, (after > original).to(drop.dtype)]
        self._record(indices, torch.stack(columns, dim=1))

    def per_image_figures(self) -> dict[str, Tensor]:
        """``AD@v`` (the image's drop) and ``IC@v`` (0 or 100) per image (N,), in percent."""
        _, values = self.per_image()
        figures = {}
        for position, threshold in enumerate(self.thresholds):
            name = _format_threshold(threshold)
            figures[f"AD@{name}"] = values[:, 2 * position] * 100
            figures[f"IC@{name}"] = values[:, 2 * position + 1] * 100
        return figures

    def compute(self) -> dict[str, Tensor]:
        """``{"AD@v": percent, "IC@v": percent}`` for each threshold v."""
        _, values = self.per_image()
        means = values.mean(dim=0) * 100
        results = {}
        for position, threshold in enumerate(self.thresholds):
            name = _format_threshold(threshold)
            results[f"AD@{name}"] = means[2 * position].float()
            results[f"IC@{name}"] = means[2 * position + 1].float()
        return results

"""Shared machinery of the faithfulness metrics.

Every metric is a torchmetrics ``Metric`` that records one value per image together with the
image's dataset index. ``compute()`` keeps one value per index, so the duplicates that a
``DistributedSampler`` pads onto the last batches of some processes are never counted twice,
and 1 or N processes give the same number on the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ptame.metrics.ranking import rank_positions, ranking
from ptame.networks.frozen import IMAGE_RANGE_TOLERANCE, as_float32_images, check_image_values

BackboneFn = Callable[[Tensor], Tensor]

#: images per backbone call of a metric on CPU: a CPU forward slows down per image once a call's
#: activations outgrow the caches (ResNet-50, 224 px, 2-core CPU: 43.8 ms per image at 8 images
#: per call, 46.3 at 1, 56.6 at 16, 66.2 at 32, 73.0 at 64). GPUs take the whole call.
CPU_IMAGES_PER_FORWARD = 8


def classify(backbone: BackboneFn, images: Tensor) -> Tensor:
    """``backbone(images)``: logits (B, C) of images (B, 3, H, W) in [0, 1], on CPU in calls of
    at most :data:`CPU_IMAGES_PER_FORWARD` images (the same logits, up to float rounding)."""
    if images.device.type != "cpu" or images.shape[0] <= CPU_IMAGES_PER_FORWARD:
        return backbone(images)
    return torch.cat([backbone(part) for part in images.split(CPU_IMAGES_PER_FORWARD)])


def original_logits(backbone: BackboneFn, images: Tensor, logits: Tensor | None, who: str) -> Tensor:
    """The backbone's logits (B, C) of the unmodified ``images`` (B, 3, H, W): ``logits`` when
    the caller already has them (one forward shared by the explainer and every metric of a
    batch, :func:`ptame.evaluation.suite.evaluate_batch`), else one :func:`classify` call.
    A ValueError names ``who`` for logits that are not (B, C) on the images' device."""
    if logits is None:
        return classify(backbone, images)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0] or logits.device != images.device:
        raise ValueError(f"{who}: logits must be the backbone's (B, C) = ({images.shape[0]}, C) logits of the "
                         f"images on {images.device}, got shape {tuple(logits.shape)} on {logits.device}")
    return logits


def deduplicate(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the first row per unique index.

    Args:
        indices: (N,) int64 dataset indices (may repeat).
        values: (N, ...) per-image values.

    Returns:
        (unique indices sorted ascending, their values).
    """
    order = torch.argsort(indices, stable=True)
    indices, values = indices[order], values[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return indices[first], values[first]


PIXEL_RULES = ("exact", "release")

#: suffix of a figure's standard error over images in the results (``AD@15_se``)
STANDARD_ERROR_SUFFIX = "_se"


def pixel_count(fraction: float, pixels: int) -> int:
    """round(fraction * pixels): the number of pixels a fraction selects (``"exact"`` rule)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(round(fraction * pixels))


def top_pixels(maps: Tensor, fraction: float, indices: Tensor, seed: int) -> Tensor:
    """(B, H, W) bool: exactly round(fraction * H * W) highest-valued pixels of each map.

    Pixels of equal value are taken in the order of seeded per-image keys
    (:func:`~ptame.metrics.ranking.ranking`), so ties are broken the same way for an image in any
    batch, and distinct values are never reordered.
    """
    batch, height, width = maps.shape
    count = pixel_count(fraction, height * width)
    positions = rank_positions(ranking(maps, indices, seed, descending=True))
    return (positions < count).view(batch, height, width)


def kth_value_threshold(maps: Tensor, fraction: float) -> Tensor:
    """(B, 1) the k-th smallest value of each map, k = int(fraction * H * W) (at least 1): the
    threshold of the authors' released evaluation (``torch.kthvalue``)."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.kthvalue(k, dim=1, keepdim=True).values


def release_kept_pixels(maps: Tensor, fraction: float) -> Tensor:
    """(B, H, W) bool: the pixels the authors' released AD/IC keeps for ``fraction`` of a map.
    Every pixel when the fraction is 1, else those strictly above the k-th smallest value,
    k = int(H W (1 - fraction)): H W - k pixels when the values are distinct (615 of 4096 at
    15 %, where round(0.15 x 4096) = 614), fewer when pixels tie with the threshold."""
    if fraction >= 1.0:
        return torch.ones_like(maps, dtype=torch.bool)
    threshold = kth_value_threshold(maps, 1.0 - fraction)
    return (maps.flatten(1) > threshold).view_as(maps)


def check_batch(
    images: Tensor, maps: Tensor, indices: Tensor | None, who: str, maps_in_unit_range: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a metric update and return (images, maps, indices): float16/float64 images and
    maps as float32, indices (B,) int64.

    Raises a ValueError naming ``who``, the argument and the fix for: wrong shapes, images that
    are not finite values in [0, 1] (e.g. 0-255 or normalised), maps with NaN or infinite values,
    maps outside [0, 1] where their values are used (``maps_in_unit_range``: soft AD/IC), and
    missing or miscounted indices.
    """
    if images.ndim != 4:
        raise ValueError(f"{who}: images must be (B, C, H, W), got {tuple(images.shape)}")
    expected = (images.shape[0], *images.shape[-2:])
    if tuple(maps.shape) != expected:
        raise ValueError(f"{who}: maps must be (B, H, W) = {expected}, got {tuple(maps.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be float RGB in [0, 1], got dtype {images.dtype}; "
                         "convert uint8 images with images.float() / 255")
    check_image_values(images, who)
    maps = as_float32_images(maps) if maps.is_floating_point() else maps.float()
    if maps.numel() and not torch.isfinite(maps).all():
        raise ValueError(f"{who}: saliency maps contain NaN or infinite values")
    if maps_in_unit_range and maps.numel():
        low, high = torch.stack([maps.amin(), maps.amax()]).tolist()
        if low < -IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
            raise ValueError(f"{who}: soft masking multiplies the images by the maps, which must be in "
                             f"[0, 1]; got values in [{low:.4g}, {high:.4g}]: normalise them (e.g. "
                             "min-max per map) or use hard masking")
    if indices is None:
        raise ValueError(
            f"{who}: pass the images' dataset indices (batch['index']) so that padded "
            "duplicates under DistributedSampler are not counted twice"
        )
    indices = torch.as_tensor(indices, device=images.device).long().view(-1)
    if indices.shape[0] != images.shape[0]:
        raise ValueError(f"{who}: got {indices.shape[0]} indices for {images.shape[0]} images")
    return as_float32_images(images), maps, indices


def lookup_direction(directions: dict[str, str], key: str) -> str | None:
    """``directions[key]``, or the direction of the longest ``"<prefix>@"`` entry that ``key``
    starts with (``"AD@"`` covers ``"AD@15"``), or None."""
    if key in directions:
        return directions[key]
    prefixes = [p for p in directions if p.endswith("@") and key.startswith(p)]
    return directions[max(prefixes, key=len)] if prefixes else None


class PerImageMetric(Metric):
    """Stores (index, per-image values) pairs; subclasses turn them into figures."""

    full_state_update = False
    #: ``update`` takes ``logits=``, the backbone's logits of the unmodified images, instead of
    #: computing them (:func:`original_logits`)
    takes_logits: ClassVar[bool] = False
    #: result key (or ``"<prefix>@"`` for a family of keys) -> ``"min"`` or ``"max"``: the
    #: direction in which the figure is better (tables mark the best value with it).
    directions: ClassVar[dict[str, str]] = {}

    @classmethod
    def direction(cls, key: str) -> str | None:
        """``"min"``, ``"max"`` or None for a result key of this metric (see :attr:`directions`)."""
        return lookup_direction(cls.directions, key)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _record(self, indices: Tensor, values: Tensor) -> None:
        self.indices.append(indices.detach().long())
        self.values.append(values.detach().double())

    def per_image_figures(self) -> dict[str, Tensor] | Tensor:
        """Each figure of ``compute()`` per image (N,), whose mean is the figure (a dict with
        compute()'s keys, or one tensor for a metric computing one value)."""
        raise NotImplementedError

    def standard_errors(self) -> dict[str, Tensor] | Tensor:
        """The standard error over images (sample standard deviation / sqrt(N); NaN for one
        image) of each figure of ``compute()``: the uncertainty a table reports beside it."""
        figures = self.per_image_figures()

        def error(values: Tensor) -> Tensor:
            count = values.shape[0]
            if count < 2:
                return torch.tensor(float("nan"), device=values.device)
            return (values.double().std(unbiased=True) / count**0.5).float()

        if isinstance(figures, Tensor):
            return error(figures)
        return {key: error(values) for key, values in figures.items()}

    def per_image(self) -> tuple[Tensor, Tensor]:
        """(unique indices (N,), values (N, ...)) over everything seen on all processes."""
        if isinstance(self.indices, list) and not self.indices:
            raise ValueError(f"{type(self).__name__}.compute() called before any update")
        indices = dim_zero_cat(self.indices)
        values = dim_zero_cat(self.values)
        return deduplicate(indices, values)

"""Saliency-map and image helpers shared by the model, the explainers, the metrics and the
figures."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: ITU-R BT.601 luma weights of an RGB -> grey conversion (OpenCV, PIL).
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def minmax_maps(maps: Tensor) -> Tensor:
    """Rescale each map of (..., h, w) linearly to [0, 1] over its own pixels.

    A constant map (no ranking information) becomes all zeros. Same shape and dtype as ``maps``.
    """
    flat = maps.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat)).view_as(maps)


def finite_minmax_maps(maps: Tensor) -> Tensor:
    """:func:`minmax_maps` in float32 after NaN and infinite values are set to 0 (maps that
    libraries return, e.g. a CAM of a class with zero gradients)."""
    return minmax_maps(torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0))


def upsample_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling (align_corners=False) of (B, h, w) maps to (B, H, W); values stay in
    the input range. Maps already at ``size`` are returned as they are."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(
        maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False
    ).squeeze(1)


def to_grey(images: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> (B, H, W) grey with the BT.601 luma weights."""
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1)

"""Saliency-map and image helpers shared by the model, the explainers, the metrics and the
figures."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _interpolation_matrix_cpu(in_size: int, out_size: int) -> Tensor:
    identity = torch.eye(in_size, dtype=torch.float64).unsqueeze(0)  # channel j = unit vector e_j
    resized = F.interpolate(identity, size=out_size, mode="linear", align_corners=False)
    return resized[0].t().contiguous()


UPSAMPLING_MODES = ("one_step", "stepwise")


@functools.lru_cache(maxsize=64)
def _stepwise_matrix_cpu(in_size: int, out_size: int) -> Tensor:
    steps = out_size // in_size
    if in_size * steps != out_size or steps & (steps - 1):
        raise ValueError(
            f"stepwise upsampling needs a power-of-two ratio, got {in_size} -> {out_size} "
            "(use upsampling=one_step for any ratio)"
        )
    matrix = torch.eye(in_size, dtype=torch.float64)
    size = in_size
    while size < out_size:  # the release's repeated x2 bilinear steps
        matrix = _interpolation_matrix_cpu(size, 2 * size) @ matrix
        size *= 2
    return matrix


def interpolation_matrix(
    in_size: int, out_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    mode: str = "one_step",
) -> Tensor:
    """(out_size, in_size) matrix A of 1-D linear interpolation, align_corners=False, so that
    resizing a map X (h, w) bilinearly is ``A_h @ X @ A_w.T``.

    ``mode="one_step"``: the weights ``F.interpolate(..., mode="bilinear", align_corners=False)``
    applies along one axis for any size (without antialiasing; each row holds at most two non-zero
    weights summing to 1). ``"stepwise"``: repeated x2 bilinear steps (the authors' released
    attention: 7 -> 14 -> 28 -> 56), for power-of-two ratios; wider kernels, other values.
    """
    if mode not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {mode!r}")
    return _interpolation_matrix_on(int(in_size), int(out_size), torch.device(device), dtype, mode)


@functools.lru_cache(maxsize=256)
def _interpolation_matrix_on(
    in_size: int, out_size: int, device: torch.device, dtype: torch.dtype, mode: str
) -> Tensor:
    """The matrix on its device, built once: copying it from the host at every call would make
    each training step wait for the GPU (a pageable host-to-device copy synchronises)."""
    if mode == "stepwise" and out_size != in_size:
        matrix = _stepwise_matrix_cpu(in_size, out_size)
    else:
        matrix = _interpolation_matrix_cpu(in_size, out_size)
    return matrix.to(device=device, dtype=dtype)


def resize_maps(maps: Tensor, size: Sequence[int], mode: str = "one_step") -> Tensor:
    """Bilinear resizing (align_corners=False, no antialiasing) of maps (..., h, w) to
    (..., H, W) as two matrix products, ``A_h @ X @ A_w.T`` (:func:`interpolation_matrix`, in
    one step or, with ``mode="stepwise"``, by repeated x2 steps).

    The same values as ``F.interpolate`` up to float rounding, with a backward pass that is two
    matrix products too (no atomic scatter): fast on GPUs for many maps at once, e.g. the
    (B, |S|, h, w) class maps of a training step. Maps already at ``size`` are returned as they
    are.
    """
    height, width = int(size[0]), int(size[1])
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    *lead, h, w = maps.shape
    flat = maps.reshape(-1, h, w)
    columns = interpolation_matrix(w, width, maps.device, maps.dtype, mode)
    rows = interpolation_matrix(h, height, maps.device, maps.dtype, mode)
    widened = torch.matmul(flat, columns.t())  # (N, h, W): one GEMM over all rows
    resized = torch.matmul(rows.expand(flat.shape[0], height, h), widened)  # (N, H, W)
    return resized.view(*lead, height, width)

"""The area and variation terms of the P-TAME loss as one fused GPU kernel (Triton).

For a training batch the loss regularises B x |S| maps (|S| = B in the paper's and the
release's settings: 65 536 maps of 56 x 56 pixels at batch 256). Computed with PyTorch
operations, every step of ``sigmoid -> area -> variation`` and of their backward reads and writes
the whole map tensor again; here the forward pass is one kernel that reads the raw scores once
and returns per-map partial sums, and the backward pass is one kernel that reads them again and
writes the gradient, with the derivatives written out (:func:`regulariser_terms`). Each program
handles a tile of rows of one map; the neighbours that the finite differences need are read from
the scores in memory (cache hits), so tiles are independent.

:func:`ptame.losses.regulariser_terms` uses this on CUDA when Triton is available and the
reference PyTorch operations elsewhere; a test checks both against each other (values and
gradients) with Triton's interpreter on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_TILE = 4096  # elements per program: rows x next_power_of_two(width)


@dataclass(frozen=True)
class RegulariserSettings:
    """The constants of :func:`ptame.losses.area_loss` and :func:`ptame.losses.variation_loss`."""

    area_power: float
    area_epsilon: float
    area_floor: float
    variation_power: float
    border_penalty: float
    variation_normalisation: str


@triton.jit
def _power(x, p, SQUARE: tl.constexpr):
    """x ** p for x >= 0 (0 ** p = 0). The floor inside the log is a normal float32 (a literal
    below 2^-126 would be typed float64 by Triton's compiler)."""
    if SQUARE:
        return x * x
    return tl.where(x > 0, tl.exp2(p * tl.log2(tl.maximum(x, 1e-30))), 0.0)


@triton.jit
def _power_slope(d, q, SQUARE: tl.constexpr):
    """d/dd |d| ** q = q |d| ** (q - 1) sign(d), 0 at d = 0."""
    if SQUARE:
        return 2.0 * d
    magnitude = tl.abs(d)
    slope = q * tl.exp2((q - 1.0) * tl.log2(tl.maximum(magnitude, 1e-30)))
    return tl.where(d > 0, slope, tl.where(d < 0, -slope, 0.0))


@triton.jit
def _sigmoid_at(base, rows, cols, height, width, valid):
    values = tl.load(base + rows * width + cols, mask=valid, other=0.0)
    return tl.sigmoid(values.to(tl.float32))


@triton.jit
def _regulariser_kernel(
    scores_ptr, gradient_ptr, area_ptr, variation_ptr, area_grad_ptr, variation_grad_ptr,
    height, width, tiles,
    area_power, area_epsilon, area_floor, variation_power, border_penalty,
    area_scale, variation_scale,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, AREA_LINEAR: tl.constexpr,
    SQUARE: tl.constexpr, BACKWARD: tl.constexpr,
):
    program = tl.program_id(0)
    image_map, tile = program // tiles, program % tiles
    rows = tile * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < height) & (cols < width)
    base = scores_ptr + image_map.to(tl.int64) * height * width
    e = _sigmoid_at(base, rows, cols, height, width, inside)
    right = inside & (cols + 1 < width)
    down = inside & (rows + 1 < height)
    dx = tl.where(right, _sigmoid_at(base, rows, cols + 1, height, width, right) - e, 0.0)
    dy = tl.where(down, _sigmoid_at(base, rows + 1, cols, height, width, down) - e, 0.0)
    # border rows and columns (a corner counts once for its row, once for its column)
    border = ((rows == 0).to(tl.float32) + (rows == height - 1).to(tl.float32)
              + (cols == 0).to(tl.float32) + (cols == width - 1).to(tl.float32))
    border = tl.where(inside, border, 0.0)
    shifted = tl.maximum(e + area_epsilon, area_floor)
    if not BACKWARD:
        if AREA_LINEAR:
            area = tl.where(inside, e, 0.0)
        else:
            area = tl.where(inside, _power(shifted, area_power, False), 0.0)
        variation = (_power(tl.abs(dx), variation_power, SQUARE)
                     + _power(tl.abs(dy), variation_power, SQUARE)
                     + border_penalty * border * _power(e, variation_power, SQUARE))
        tl.store(area_ptr + program, tl.sum(tl.sum(area, axis=1), axis=0))
        tl.store(variation_ptr + program, tl.sum(tl.sum(variation, axis=1), axis=0))
    else:
        left = inside & (cols > 0)
        up = inside & (rows > 0)
        dleft = tl.where(left, e - _sigmoid_at(base, rows, cols - 1, height, width, left), 0.0)
        dup = tl.where(up, e - _sigmoid_at(base, rows - 1, cols, height, width, up), 0.0)
        variation_slope = (_power_slope(dleft, variation_power, SQUARE)
                           - _power_slope(dx, variation_power, SQUARE)
                           + _power_slope(dup, variation_power, SQUARE)
                           - _power_slope(dy, variation_power, SQUARE)
                           + border_penalty * border * _power_slope(e, variation_power, SQUARE))
        if AREA_LINEAR:
            area_slope = tl.full(e.shape, 1.0, tl.float32)
        else:
            # the floor is a clamp: no gradient below it
            area_slope = tl.where(e + area_epsilon >= area_floor,
                                  area_power * _power(shifted, area_power - 1.0, False), 0.0)
        area_weight = tl.load(area_grad_ptr).to(tl.float32) * area_scale
        variation_weight = tl.load(variation_grad_ptr).to(tl.float32) * variation_scale
        gradient = e * (1.0 - e) * (area_weight * area_slope + variation_weight * variation_slope)
        out = gradient_ptr + image_map.to(tl.int64) * height * width + rows * width + cols
        tl.store(out, gradient.to(gradient_ptr.dtype.element_ty), mask=inside)


def _launch(scores: Tensor, settings: RegulariserSettings, backward: bool,
            area_grad: Tensor | None = None, variation_grad: Tensor | None = None,
            area_scale: float = 0.0, variation_scale: float = 0.0) -> tuple[Tensor, ...]:
    height, width = scores.shape[-2:]
    maps = scores.numel() // (height * width)
    block_w = triton.next_power_of_2(width)
    block_h = max(1, min(triton.next_power_of_2(height), _MAX_TILE // block_w))
    tiles = triton.cdiv(height, block_h)
    grid = (maps * tiles,)
    sums = scores.new_empty((2, maps * tiles), dtype=torch.float32)
    gradient = torch.empty_like(scores) if backward else scores
    unit = scores.new_ones((), dtype=torch.float32)
    _regulariser_kernel[grid](
        scores, gradient, sums[0], sums[1],
        unit if area_grad is None else area_grad, unit if variation_grad is None else variation_grad,
        height, width, tiles,
        settings.area_power, settings.area_epsilon, settings.area_floor,
        settings.variation_power, settings.border_penalty, area_scale, variation_scale,
        BLOCK_H=block_h, BLOCK_W=block_w, AREA_LINEAR=settings.area_power == 1,
        SQUARE=settings.variation_power == 2, BACKWARD=backward,
    )
    return (gradient,) if backward else (sums[0], sums[1])


def _normalisers(scores: Tensor, settings: RegulariserSettings) -> tuple[float, float]:
    """(1 / area denominator, 1 / variation denominator) for scores (B, S, h, w)."""
    area = 1.0 / scores.numel()
    if settings.variation_normalisation == "mean":
        return area, 1.0 / scores.numel()
    return area, 1.0 / (settings.variation_power * scores.shape[0])


class FusedRegularisers(torch.autograd.Function):
    """``(area, variation) = FusedRegularisers.apply(scores (B, S, h, w), settings)`` with the
    maps ``sigmoid(scores)``; CUDA tensors (or any device under Triton's interpreter)."""

    @staticmethod
    def forward(ctx, scores: Tensor, settings: RegulariserSettings) -> tuple[Tensor, Tensor]:
        scores = scores.contiguous()
        area_sums, variation_sums = _launch(scores, settings, backward=False)
        area_scale, variation_scale = _normalisers(scores, settings)
        ctx.save_for_backward(scores)
        ctx.settings = settings
        return area_sums.sum() * area_scale, variation_sums.sum() * variation_scale

    @staticmethod
    def backward(ctx, area_grad: Tensor | None, variation_grad: Tensor | None):
        (scores,) = ctx.saved_tensors
        area_scale, variation_scale = _normalisers(scores, ctx.settings)
        if area_grad is None:
            area_scale = 0.0
        if variation_grad is None:
            variation_scale = 0.0
        (gradient,) = _launch(scores, ctx.settings, backward=True,
                              area_grad=None if area_grad is None else area_grad.float().reshape(1),
                              variation_grad=None if variation_grad is None else variation_grad.float().reshape(1),
                              area_scale=area_scale, variation_scale=variation_scale)
        return gradient, None

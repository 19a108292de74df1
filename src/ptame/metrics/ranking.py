"""Pixel rankings and per-image random numbers that do not depend on batching, processes or device.

Rankings order pixels by their map value; only pixels of exactly equal value are ordered among
themselves, by a key drawn per image and pixel (:func:`ranking`), so that distinct values are
never reordered and ties are broken the same way for an image whatever batch, process or device
it is evaluated in. The keys and the imputation noise come from a counter-based generator: a
hash of (seed, stream, dataset index, element), computed with integer tensor operations on the
images' device, so there is no per-image generator and no host round trip.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _multiply32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow
    (the constant is split into 16-bit halves)."""
    high, low = constant >> 16, constant & 0xFFFF
    return ((((x * high) & 0xFFFF) << 16) + x * low) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply, two rounds) of int64 tensors of 32-bit values."""
    x = x ^ (x >> 16)
    x = _multiply32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _multiply32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(seed: int, stream: int, indices: Tensor, count: int) -> Tensor:
    """(B, count) int64 pseudo-random 32-bit values: element j of row b is a hash of
    (seed, stream, indices[b], j), the same on every device and for any batching."""
    indices = indices.to(torch.int64).view(-1, 1)
    element = torch.arange(count, device=indices.device, dtype=torch.int64).view(1, -1)
    state = _mix32(torch.full_like(indices, (int(seed) * 0x9E3779B1 + int(stream)) & _MASK32))
    state = _mix32(state ^ (indices & _MASK32))
    state = _mix32(state ^ ((indices >> 32) & _MASK32))
    return _mix32(state ^ element)


def per_image_uniform(indices: Tensor, shape: tuple[int, ...], seed: int, stream: int = 0) -> Tensor:
    """(B, *shape) float32 uniform numbers in [0, 1) (24 random bits), row b determined by
    (seed, stream, indices[b]) alone, on the indices' device."""
    bits = random_bits(seed, stream, indices, math.prod(shape))
    return ((bits >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(-1, *shape)


def per_image_normal(indices: Tensor, shape: tuple[int, ...], seed: int, stream: int = 1) -> Tensor:
    """(B, *shape) float32 standard normal numbers (Box-Muller on two independent uniform
    streams), row b determined by (seed, stream, indices[b]) alone, on the indices' device."""
    first = per_image_uniform(indices, shape, seed, 2 * stream)
    second = per_image_uniform(indices, shape, seed, 2 * stream + 1)
    radius = torch.sqrt(-2.0 * torch.log1p(-first))  # 1 - u in (0, 1]: finite
    return radius * torch.cos((2 * math.pi) * second)


def ranking(maps: Tensor, indices: Tensor, seed: int, descending: bool = True) -> Tensor:
    """(B, H*W) pixel order of each map, highest value first (``descending``) or lowest first;
    pixels of exactly equal value are ordered by a key seeded by (seed, dataset index, pixel).

    Args:
        maps: (B, H, W) saliency.
        indices: (B,) dataset indices of the images.
        seed: seed of the tie-breaking keys.
    """
    flat = maps.flatten(1)
    keys = random_bits(seed, 0, indices.to(flat.device), flat.shape[1])
    by_key = keys.argsort(dim=1)
    by_value = flat.gather(1, by_key).argsort(dim=1, descending=descending, stable=True)
    return by_key.gather(1, by_value)


def rank_positions(order: Tensor) -> Tensor:
    """(B, N) position of every pixel in ``order`` (B, N) (the inverse permutation)."""
    positions = torch.empty_like(order)
    steps = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return positions.scatter_(1, order, steps)

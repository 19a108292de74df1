"""Pixel rankings with reproducible, batching-independent tie-breaking."""

from __future__ import annotations

import torch
from torch import Tensor

JITTER = 1e-6


def image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator determined by (seed, dataset index) alone, so that every image gets the
    same random numbers however the data is batched or split across processes."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))


def per_image_uniform(indices: Tensor, shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """(B, *shape) uniform [0, 1) numbers, row b drawn from ``image_generator(seed, indices[b])``."""
    rows = [torch.rand(shape, generator=image_generator(seed, int(i))) for i in indices.tolist()]
    return torch.stack(rows).to(device)


def per_image_normal(indices: Tensor, shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """(B, *shape) standard normal numbers, row b seeded by (seed, indices[b])."""
    rows = [torch.randn(shape, generator=image_generator(seed, int(i))) for i in indices.tolist()]
    return torch.stack(rows).to(device)


def jittered(maps: Tensor, indices: Tensor, seed: int, scale: float = JITTER) -> Tensor:
    """maps (B, H, W) plus a seeded uniform jitter in [0, scale): breaks ties in rankings."""
    noise = per_image_uniform(indices, tuple(maps.shape[1:]), seed, maps.device)
    return maps.float() + scale * noise

"""Reference maps that carry no information about the backbone: what a metric gives for nothing."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ptame.explainers.base import Explainer
from ptame.networks import Backbone


class RandomExplainer(Explainer):
    """Independent uniform noise in [0, 1] per pixel.

    The noise of each image is drawn from a generator seeded by ``seed`` and a checksum of the
    image's content, so an image gets the same map however the data is batched or split across
    processes (evaluation gives the same numbers on 1 or N processes).

    Args:
        backbone: optional; only used to resolve targets (which the map ignores).
        seed: seed combined with each image's checksum.
    """

    name = "random"

    def __init__(self, backbone: Backbone | None = None, seed: int = 0) -> None:
        super().__init__(backbone)
        self.seed = int(seed)

    def _image_seed(self, image: Tensor) -> int:
        quantised = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return (self.seed * 1_000_003 + zlib.crc32(quantised.numpy().tobytes())) % (2**63 - 1)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        _, _, height, width = images.shape
        maps = [
            torch.rand((height, width), generator=torch.Generator().manual_seed(self._image_seed(image)))
            for image in images
        ]
        return torch.stack(maps).to(images.device)


class CentreGaussianExplainer(Explainer):
    """An isotropic Gaussian centred on the image, peak 1, the same for every image.

    Args:
        backbone: optional; only used to resolve targets (which the map ignores).
        sigma: standard deviation as a fraction of the shorter image side.
    """

    name = "centre_gaussian"

    def __init__(self, backbone: Backbone | None = None, sigma: float = 0.25) -> None:
        super().__init__(backbone)
        if not sigma > 0:
            raise ValueError(f"centre Gaussian sigma must be positive, got {sigma}")
        self.sigma = float(sigma)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        batch, _, height, width = images.shape
        ys = torch.arange(height, device=images.device, dtype=torch.float32) - (height - 1) / 2
        xs = torch.arange(width, device=images.device, dtype=torch.float32) - (width - 1) / 2
        sigma = self.sigma * min(height, width)
        gaussian = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
        return gaussian.expand(batch, height, width).clone()

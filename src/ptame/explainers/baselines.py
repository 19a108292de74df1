"""Reference maps that carry no information about the backbone: what a metric gives for nothing."""

from __future__ import annotations

import torch
from torch import Tensor

from ptame.explainers.base import Explainer
from ptame.networks import Backbone


class RandomExplainer(Explainer):
    """Independent uniform noise in [0, 1] per pixel, drawn from a seeded generator.

    Args:
        backbone: optional; only used to resolve targets (which the map ignores).
        seed: seed of the generator; the n-th call after construction is reproducible.
    """

    name = "random"

    def __init__(self, backbone: Backbone | None = None, seed: int = 0) -> None:
        super().__init__(backbone)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        batch, _, height, width = images.shape
        maps = torch.rand((batch, height, width), generator=self._generator)
        return maps.to(images.device)


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

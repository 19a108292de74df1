"""Reference maps that carry no information about the backbone: what a metric gives for nothing,
and an edge detector that ignores the model (the MPRT negative control)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ptame.explainers.base import Explainer, image_content_seed
from ptame.maps import minmax_maps, to_grey
from ptame.networks.frozen import Backbone


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

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        _, _, height, width = images.shape
        maps = [
            torch.rand((height, width), generator=torch.Generator().manual_seed(image_content_seed(image, self.seed)))
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


class SobelEdgeExplainer(Explainer):
    """A control that ignores the model: the Sobel gradient magnitude of the grey image,
    min-max normalised per image. Adebayo et al. show that such edge maps resemble some
    saliency maps; it must fail MPRT (its maps do not change when the model is randomised).

    Args:
        backbone: optional; only used to resolve targets (which the map ignores).
    """

    name = "sobel"

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        grey = to_grey(images).unsqueeze(1)
        kernel_x = images.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([kernel_x, kernel_x.t()]).unsqueeze(1)
        gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
        return minmax_maps(gradients.pow(2).sum(1).sqrt())

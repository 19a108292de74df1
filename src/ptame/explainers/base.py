"""The one explainer interface shared by P-TAME, the baselines and every metric."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ptame.networks import Backbone, check_images


class Explainer(nn.Module):
    """``explainer(images, targets=None) -> maps``.

    Args of ``forward``:
        images: (B, 3, H, W) float RGB in [0, 1].
        targets: (B,) int64 classes to explain; None explains the backbone's predictions.

    Returns:
        (B, H, W) float maps in [0, 1] at the images' resolution, on the images' device.

    Subclasses implement :meth:`explain` with the targets already resolved.
    """

    #: the name used in configs and result tables
    name: str = "explainer"

    def __init__(self, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.backbone = backbone

    def predict(self, images: Tensor) -> Tensor:
        """The backbone's predicted classes (B,) for [0, 1] images."""
        if self.backbone is None:
            raise ValueError(f"explainer {self.name!r} has no backbone to predict targets with")
        with torch.no_grad():
            return self.backbone(images).argmax(dim=1)

    def resolve_targets(self, images: Tensor, targets: Tensor | None) -> Tensor | None:
        """Validate ``targets`` against the batch; default to the backbone's predictions."""
        if targets is None:
            return self.predict(images) if self.backbone is not None else None
        targets = torch.as_tensor(targets, device=images.device).long().view(-1)
        if targets.shape[0] != images.shape[0]:
            raise ValueError(
                f"{self.name}: got {targets.shape[0]} targets for {images.shape[0]} images"
            )
        return targets

    def forward(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        check_images(images, f"explainer {self.name!r}")
        maps = self.explain(images, self.resolve_targets(images, targets))
        expected = (images.shape[0], *images.shape[-2:])
        if tuple(maps.shape) != expected:
            raise RuntimeError(
                f"explainer {self.name!r} returned maps of shape {tuple(maps.shape)}, "
                f"expected {expected}"
            )
        return maps

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """Maps (B, H, W) in [0, 1] for resolved targets (None only without a backbone)."""
        raise NotImplementedError

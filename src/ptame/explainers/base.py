"""The one explainer interface shared by P-TAME, the baselines and every metric."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from ptame.networks.frozen import Backbone, as_float32_images, check_image_values, check_images


def image_content_seed(image: Tensor, seed: int) -> int:
    """A seed from ``seed`` and a checksum of the image's 8-bit content (3, H, W), so that an
    image gets the same random draws however the data is batched or split across processes."""
    quantised = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return (int(seed) * 1_000_003 + zlib.crc32(quantised.numpy().tobytes())) % (2**63 - 1)


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
    #: maps come from a head trained to explain the backbone (P-TAME, T-TAME): MPRT's retrain
    #: protocol retrains it on each randomised backbone
    has_trained_head: bool = False

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
        """Validate ``targets`` against the batch; default to the backbone's predictions.

        Raises:
            TypeError: targets that are not integer class ids (float or bool).
            ValueError: a count other than the batch's, or an id outside [0, C).
        """
        if targets is None:
            return self.predict(images) if self.backbone is not None else None
        targets = torch.as_tensor(targets, device=images.device)
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"{self.name}: targets must be integer class ids, got dtype {targets.dtype}; "
                            "pass e.g. torch.tensor([3, 7]) (int64), or targets.long() if these are ids")
        targets = targets.long().view(-1)
        if targets.shape[0] != images.shape[0]:
            raise ValueError(
                f"{self.name}: got {targets.shape[0]} targets for {images.shape[0]} images"
            )
        if targets.numel():
            low, high = torch.stack([targets.min(), targets.max()]).tolist()
            classes = self.backbone.class_count(images) if isinstance(self.backbone, Backbone) else None
            if low < 0 or (classes is not None and high >= classes):
                bad = low if low < 0 else high
                valid = f"[0, {classes - 1}]" if classes is not None else ">= 0"
                raise ValueError(f"{self.name}: target class {bad} is not a class of the backbone (valid: "
                                 f"{valid}; a negative id would index from the end and explain another class)")
        return targets

    def forward(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        check_images(images, f"explainer {self.name!r}")
        check_image_values(images, f"explainer {self.name!r}")
        images = as_float32_images(images)
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


def batched_maps(
    explainer: Explainer, images: Tensor, targets: Tensor, raw: bool = False, batch_size: int = 32
) -> Tensor:
    """Float maps for ``targets`` (B,), ``batch_size`` images per explainer call, no gradient.

    With ``raw`` and an explainer that exposes its maps before upsampling
    (``low_resolution_maps``: P-TAME, T-TAME) they are (B, h, w) at the explanation's resolution;
    otherwise (B, H, W) at the images' resolution.
    """
    low = getattr(explainer, "low_resolution_maps", None) if raw else None
    pieces = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk, wanted = images[start:start + batch_size], targets[start:start + batch_size]
            pieces.append(low(chunk, wanted) if low is not None else explainer(chunk, wanted))
    return torch.cat(pieces).float()

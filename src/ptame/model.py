"""P-TAME as a plain nn.Module: frozen backbone + frozen auxiliary + trainable attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ptame.attention import AttentionMechanism
from ptame.maps import minmax_maps, resize_maps
from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone

MapNormalisation = Literal["sigmoid", "minmax"]


def normalise_scores(scores: Tensor, mode: MapNormalisation) -> Tensor:
    """Turn raw attention scores (..., h, w) into maps in [0, 1].

    ``"sigmoid"`` is the paper's output activation (used in training). ``"minmax"`` rescales
    each map to [0, 1] (the release does this at evaluation time); a constant map becomes 0.
    """
    if mode == "sigmoid":
        return torch.sigmoid(scores)
    if mode == "minmax":
        return minmax_maps(scores)
    raise ValueError(f"unknown map normalisation {mode!r}; use 'sigmoid' or 'minmax'")


def mask_images(images: Tensor, maps: Tensor) -> Tensor:
    """Paper Eq. 1: x * up_bilinear(E) in [0, 1] pixel space (the upsampling as two matrix
    products, :func:`ptame.maps.resize_maps`: its backward needs no atomic scatter).

    Args:
        images: (B, 3, H, W) in [0, 1].
        maps: (B, h, w) in [0, 1].

    Returns:
        (B, 3, H, W) masked images in [0, 1] (masked-out pixels become black).
    """
    return images * resize_maps(maps, images.shape[-2:]).unsqueeze(1).to(images.dtype)


class PTAME(nn.Module):
    """Backbone, auxiliary feature extractor and attention mechanism.

    Channel counts, the explanation resolution and (unless given) the number of classes are
    inferred by one probe forward pass at ``input_size``.

    Args:
        backbone: the frozen classifier being explained.
        auxiliary: the frozen feature extractor.
        num_classes: C; None infers it from the backbone's output.
        input_size: (H, W) of the training images, used for the probe.
        activation: activation of the attention's feature branches.
        upsampling: ``"one_step"`` or ``"stepwise"`` (see
            :class:`~ptame.attention.AttentionMechanism`).
    """

    def __init__(
        self,
        backbone: Backbone,
        auxiliary: AuxiliaryFeatureExtractor,
        num_classes: int | None = None,
        input_size: Sequence[int] = (224, 224),
        activation: str = "relu",
        upsampling: str = "one_step",
    ) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a ptame.networks.Backbone, got {type(backbone)}")
        if not isinstance(auxiliary, AuxiliaryFeatureExtractor):
            raise TypeError(
                f"auxiliary must be a ptame.networks.AuxiliaryFeatureExtractor, got {type(auxiliary)}"
            )
        self.backbone = backbone
        self.auxiliary = auxiliary
        self.input_size = [int(s) for s in input_size]
        probe = torch.full((1, 3, *self.input_size), 0.5)
        with torch.no_grad():
            features = auxiliary(probe)
            backbone_classes = int(backbone(probe).shape[1])
        if num_classes is not None and int(num_classes) != backbone_classes:
            raise ValueError(
                f"num_classes={num_classes} but backbone {backbone.name!r} "
                f"outputs {backbone_classes} classes"
            )
        num_classes = backbone_classes
        self.feature_channels = [int(f.shape[1]) for f in features]
        self.feature_sizes = [[int(f.shape[-2]), int(f.shape[-1])] for f in features]
        self.map_size = max(self.feature_sizes, key=lambda s: s[0] * s[1])
        self.num_classes = int(num_classes)
        self.activation = activation
        self.upsampling = upsampling
        self.attention = AttentionMechanism(self.feature_channels, self.num_classes, activation, upsampling)

    @property
    def resolution(self) -> int:
        """R: explanation pixels before upsampling (h * w)."""
        return self.map_size[0] * self.map_size[1]

    def features(self, images: Tensor) -> list[Tensor]:
        """Auxiliary feature maps of [0, 1] images (no gradient)."""
        with torch.no_grad():
            return self.auxiliary(images)

    def class_scores(self, images: Tensor, classes: Tensor | None = None) -> Tensor:
        """Raw attention scores (B, C, h, w), or (B, S, h, w) for ``classes`` (B, S)."""
        return self.attention(self.features(images), classes)

    def class_maps(self, images: Tensor, normalisation: MapNormalisation = "sigmoid") -> Tensor:
        """All C class maps (B, C, h, w) in [0, 1] at the explanation resolution."""
        return normalise_scores(self.class_scores(images), normalisation)

    def forward(self, images: Tensor) -> Tensor:
        """Sigmoid class maps (B, C, h, w)."""
        return self.class_maps(images)

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model and check its frozen networks (see
        :mod:`ptame.checkpoint`)."""
        return {
            "backbone": {**self.backbone.identity(), "config": self.backbone.config},
            "auxiliary": {**self.auxiliary.identity(), "config": self.auxiliary.config},
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "feature_channels": list(self.feature_channels),
            "feature_sizes": [list(s) for s in self.feature_sizes],
            "map_size": list(self.map_size),
            "activation": self.activation,
            "upsampling": self.upsampling,
        }

"""Named layers inside a backbone: resolving them, reading transformer tokens as maps, and the
T-TAME auxiliary whose feature maps come from the backbone's own layers.

Layer names are ``named_modules()`` names of the raw network wrapped by a
:class:`~ptame.networks.frozen.Backbone` (``backbone.model``), e.g. ``"layer4"``, ``"features.30"``
or ``"encoder.layers.encoder_layer_11.ln_1"``; the presets per architecture are in
:mod:`ptame.networks.architectures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torchvision
from torch import Tensor, nn

from ptame.networks.architectures import ttame_layers
from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone, feature_extractor, named_network


def resolve_layer(model: nn.Module, name: str, who: str) -> nn.Module:
    """The submodule of ``model`` called ``name``; a ValueError lists close names if unknown."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        near = [n for n in modules if n and n.startswith(prefix)][:12] if prefix else []
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"{who}: the backbone has no layer {name!r}; top-level layers: {top}"
            + (f"; layers under {prefix!r}: {near}" if near else "")
            + " (see backbone.model.named_modules())"
        )
    return modules[name]


def is_token_layer(model: nn.Module, layer: nn.Module) -> bool:
    """Whether ``layer`` outputs transformer tokens (B, N, C) rather than maps (B, C, h, w)."""
    vit = isinstance(model, torchvision.models.VisionTransformer)
    return vit or isinstance(layer, nn.LayerNorm)


def tokens_to_grid(tensor: Tensor) -> Tensor:
    """Transformer tokens (B, N, C) -> maps (B, C, g, g); 4-D maps pass through unchanged.

    The class token is dropped when N - 1 is a perfect square (ViT: 197 tokens -> 14 x 14);
    otherwise N itself must be a square (no class token).
    """
    if tensor.ndim != 3:
        return tensor
    count = tensor.shape[1]
    for skip in (1, 0):
        side = math.isqrt(count - skip)
        if side * side == count - skip and side > 0:
            grid = tensor[:, skip:, :].reshape(tensor.shape[0], side, side, tensor.shape[2])
            return grid.permute(0, 3, 1, 2)
    raise ValueError(
        f"cannot arrange {count} tokens on a square grid (with or without a class token)"
    )


def backbone_auxiliary(
    backbone: Backbone, layers: Sequence[str] | None = None
) -> AuxiliaryFeatureExtractor:
    """T-TAME mode: an auxiliary whose feature maps come from the backbone's own layers.

    Args:
        backbone: the frozen classifier being explained; its network must have named layers.
        layers: feature layers (``named_modules`` / feature-extraction node names of
            ``backbone.model``); None uses :func:`~ptame.networks.architectures.ttame_layers`.

    Returns:
        An :class:`~ptame.networks.frozen.AuxiliaryFeatureExtractor` over ``backbone.model``
        (parameters shared, not copied) with the backbone's own normalisation: images
        (B, 3, H, W) in [0, 1] -> list of (B, c_l, h_l, w_l). Its recipe (``config``) nests the
        backbone's recipe, so a checkpoint can rebuild it.

    Raises:
        TypeError: the backbone wraps a plain callable; ValueError: unknown layer names.
    """
    model = named_network(backbone, "T-TAME")
    layers = ttame_layers(backbone) if layers is None else [str(layer) for layer in layers]
    if not layers:
        raise ValueError("T-TAME needs at least one feature layer")
    extractor = feature_extractor(model, layers, f"backbone {backbone.name!r}")
    mean = backbone.normalize.mean.flatten().tolist()
    std = backbone.normalize.std.flatten().tolist()
    config = None
    if backbone.config is not None:
        config = {
            "_target_": "ptame.networks.backbone_auxiliary",
            "backbone": backbone.config,
            "layers": layers,
        }
    return AuxiliaryFeatureExtractor(
        extractor, layers, mean, std, name=f"backbone-features:{backbone.name}", config=config
    )

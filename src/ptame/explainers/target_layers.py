"""Named layers inside a backbone: CAM target layers, T-TAME feature layers, token grids.

Layer names are ``named_modules()`` names of the raw network wrapped by a
:class:`~ptame.networks.Backbone` (``backbone.model``), e.g. ``"layer4"``, ``"features.30"`` or
``"encoder.layers.encoder_layer_11.ln_1"``. Presets are looked up by the architecture recorded in
the backbone's rebuild recipe (``config["arch"]`` of torchvision backbones,
``config["architecture"]`` of the generated-dataset classifiers), then by the network's type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

from ptame.generated_models import SMALL_RESNET_LAYERS, SmallResNet
from ptame.model import normalise_scores
from ptame.networks import AuxiliaryFeatureExtractor, Backbone, _CallableModule, feature_extractor

#: CAM target layer per architecture: the last convolutional stage (the standard choice of
#: Grad-CAM and its successors). VGG-16 uses the output of the last block (``features.30``, the
#: final max pooling, 7x7 at 224 px: the paper's R = 49); ResNets ``layer4`` (7x7); ViT-B-16 the
#: last encoder block's ``ln_1`` (196 patch tokens on a 14x14 grid, R = 196); the generated
#: dataset's classifiers their last stage ``layer4`` (4x4 at 64 px).
CAM_TARGET_LAYERS: dict[str, str] = {
    "vgg16": "features.30",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "resnet101": "layer4",
    "resnet152": "layer4",
    "vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
    "small_vgg": "layer4",
    "small_resnet": "layer4",
}

#: T-TAME feature layers per architecture (feature maps taken from the backbone itself):
#: ResNet-50 ``layer2..4`` (T-TAME, Table 2's "ResNet-50" column, 28/14/7 px at 224 px); VGG-16
#: the outputs of its last three blocks (TAME: ``features.16``, ``features.23``, ``features.30``);
#: the generated classifiers their last three stages (16/8/4 px at 64 px).
TTAME_FEATURE_LAYERS: dict[str, list[str]] = {
    "resnet50": ["layer2", "layer3", "layer4"],
    "vgg16": ["features.16", "features.23", "features.30"],
    "small_vgg": list(SMALL_RESNET_LAYERS),
    "small_resnet": list(SMALL_RESNET_LAYERS),
}


def named_network(backbone: Backbone, who: str) -> nn.Module:
    """The raw network of ``backbone`` whose layers can be named.

    Raises:
        TypeError: ``backbone`` is not a Backbone, or wraps a plain callable (no named layers).
    """
    if not isinstance(backbone, Backbone):
        raise TypeError(f"{who} needs a ptame.networks.Backbone, got {type(backbone).__name__}")
    model = backbone.model
    # a Backbone built from a plain callable wraps it in a parameter-free adapter module
    if isinstance(model, _CallableModule):
        raise TypeError(
            f"{who} needs the backbone's layers by name, but backbone {backbone.name!r} wraps a "
            f"plain callable ({type(model.function).__name__}) without named layers; wrap an "
            "nn.Module instead"
        )
    if not list(model.named_children()):
        raise TypeError(
            f"{who} needs the backbone's layers by name, but the network of backbone "
            f"{backbone.name!r} ({type(model).__name__}) has no sub-layers"
        )
    return model


def backbone_architecture(backbone: Backbone) -> str | None:
    """The architecture name in the backbone's recipe (``arch`` / ``architecture``), or None."""
    config = backbone.config or {}
    name = config.get("arch") or config.get("architecture")
    return str(name) if name else None


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


def default_cam_layer(backbone: Backbone, who: str = "CAM") -> str:
    """The CAM target-layer name for ``backbone`` (see :data:`CAM_TARGET_LAYERS`).

    Falls back on the network's type: a torchvision VisionTransformer -> its last encoder block's
    ``ln_1``; a VGG -> the last module of ``features``; a ResNet / SmallResNet / a network with a
    ``layer4`` child -> ``layer4``.
    """
    model = named_network(backbone, who)
    arch = backbone_architecture(backbone)
    if arch in CAM_TARGET_LAYERS:
        return CAM_TARGET_LAYERS[arch]
    if isinstance(model, torchvision.models.VisionTransformer):
        last = list(model.encoder.layers.named_children())[-1][0]
        return f"encoder.layers.{last}.ln_1"
    if isinstance(model, torchvision.models.VGG):
        return f"features.{len(model.features) - 1}"
    if isinstance(model, (torchvision.models.ResNet, SmallResNet)) or hasattr(model, "layer4"):
        return "layer4"
    raise ValueError(
        f"{who}: no target-layer preset for backbone {backbone.name!r} "
        f"({type(model).__name__}); give target_layer=<name> (a name of backbone.model."
        "named_modules(), usually the last convolutional stage)"
    )


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


def normalise_maps(maps: Tensor) -> Tensor:
    """Per-map min-max to [0, 1] of (B, H, W) maps; NaN/inf become 0, a constant map becomes 0."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return normalise_scores(maps, "minmax").clamp(0, 1)


def ttame_layers(backbone: Backbone) -> list[str]:
    """The T-TAME feature layers preset for ``backbone`` (see :data:`TTAME_FEATURE_LAYERS`)."""
    model = named_network(backbone, "T-TAME")
    arch = backbone_architecture(backbone)
    if arch in TTAME_FEATURE_LAYERS:
        return list(TTAME_FEATURE_LAYERS[arch])
    if isinstance(model, (torchvision.models.ResNet, SmallResNet)):
        return ["layer2", "layer3", "layer4"]
    raise ValueError(
        f"T-TAME: no feature-layer preset for backbone {backbone.name!r} (architecture "
        f"{arch!r}, presets for {sorted(TTAME_FEATURE_LAYERS)}); give layers=[...] explicitly"
    )


def backbone_auxiliary(
    backbone: Backbone, layers: Sequence[str] | None = None
) -> AuxiliaryFeatureExtractor:
    """T-TAME mode: an auxiliary whose feature maps come from the backbone's own layers.

    Args:
        backbone: the frozen classifier being explained; its network must have named layers.
        layers: feature layers (``named_modules`` / feature-extraction node names of
            ``backbone.model``); None uses :func:`ttame_layers`.

    Returns:
        An :class:`~ptame.networks.AuxiliaryFeatureExtractor` over ``backbone.model`` (parameters
        shared, not copied) with the backbone's own normalisation: images (B, 3, H, W) in [0, 1]
        -> list of (B, c_l, h_l, w_l). Its recipe (``config``) nests the backbone's recipe, so a
        checkpoint can rebuild it.

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
            "_target_": "ptame.explainers.target_layers.backbone_auxiliary",
            "backbone": backbone.config,
            "layers": layers,
        }
    return AuxiliaryFeatureExtractor(
        extractor, layers, mean, std, name=f"backbone-features:{backbone.name}", config=config
    )


class TargetLayerMixin:
    """For explainers that read one layer of ``self.backbone.model`` named ``target_layer``
    and record that layer's map grid in ``_grid`` (h, w) when they explain."""

    backbone: Backbone
    target_layer: str
    _grid: tuple[int, int] | None

    @property
    def _layer(self) -> nn.Module:
        """The target layer inside the backbone's network."""
        return self.backbone.model.get_submodule(self.target_layer)

    @property
    def resolution(self) -> int | None:
        """R = h * w of the target layer's maps (None before the first explanation)."""
        return None if self._grid is None else self._grid[0] * self._grid[1]

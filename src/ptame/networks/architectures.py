"""Everything ptame knows per architecture, in one place: auxiliary feature layers, CAM target
layers, T-TAME feature layers, MPRT blocks and RISE mask counts.

Layer names are ``named_modules()`` names (or torchvision feature-extraction node names) of the
raw network wrapped by a :class:`~ptame.networks.frozen.Backbone` (``backbone.model``). Presets
are looked up by the architecture recorded in the network's rebuild recipe (``config["arch"]`` of
torchvision networks, ``config["architecture"]`` of the small generated-dataset classifiers),
then, where that is meaningful, by the network's type.
"""

from __future__ import annotations

import torchvision

from ptame.networks.frozen import Backbone, named_network
from ptame.networks.small import SmallResNet

#: Auxiliary feature layers (the paper's Table 2 auxiliaries): ResNet-18 ``layer1..4`` (56/28/14/7
#: px at 224 px, R = 56x56), MobileNetV3-small ``features.9..12`` and MnasNet0.5 ``layers.13..16``
#: (7x7), ResNet-50 ``layer2..4`` (T-TAME's layers, R = 28x28); the small generated-dataset
#: networks ``layer2..4`` (strides 4, 8, 16: 16/8/4 px at 64 px).
AUXILIARY_LAYERS: dict[str, list[str]] = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v3_small": ["features.9", "features.10", "features.11", "features.12"],
    "mnasnet0_5": ["layers.13", "layers.14", "layers.15", "layers.16"],
    "resnet50": ["layer2", "layer3", "layer4"],
    "small_resnet": ["layer2", "layer3", "layer4"],
    "small_vgg": ["layer2", "layer3", "layer4"],
}

#: CAM target layer per architecture: the last convolutional stage (the standard choice of
#: Grad-CAM and its successors). VGG-16 uses the output of the last block (``features.30``, the
#: final max pooling, 7x7 at 224 px: the paper's R = 49); ResNets ``layer4`` (7x7); ViT-B-16 the
#: last encoder block's ``ln_1`` (196 patch tokens on a 14x14 grid, R = 196); the small
#: generated-dataset classifiers their last stage ``layer4`` (4x4 at 64 px).
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

#: T-TAME feature layers (feature maps taken from the backbone itself): ResNet-50 ``layer2..4``
#: (T-TAME, Table 2's "ResNet-50" column, 28/14/7 px at 224 px); VGG-16 the outputs of its last
#: three blocks (TAME: ``features.16``, ``features.23``, ``features.30``); the small classifiers
#: their last three stages (16/8/4 px at 64 px).
TTAME_FEATURE_LAYERS: dict[str, list[str]] = {
    "resnet50": ["layer2", "layer3", "layer4"],
    "vgg16": ["features.16", "features.23", "features.30"],
    "small_vgg": ["layer2", "layer3", "layer4"],
    "small_resnet": ["layer2", "layer3", "layer4"],
}

#: MPRT blocks per architecture, bottom-up (input to logits): label -> module (or parameter)
#: names of ``backbone.model``.
MPRT_BLOCKS: dict[str, dict[str, list[str]]] = {
    "small_vgg": {name: [name] for name in ("stem", "layer1", "layer2", "layer3", "layer4", "fc")},
    "small_resnet": {name: [name] for name in ("stem", "layer1", "layer2", "layer3", "layer4", "fc")},
    "vgg16": {
        "conv1": ["features.0", "features.2"],
        "conv2": ["features.5", "features.7"],
        "conv3": ["features.10", "features.12", "features.14"],
        "conv4": ["features.17", "features.19", "features.21"],
        "conv5": ["features.24", "features.26", "features.28"],
        "fc6": ["classifier.0"],
        "fc7": ["classifier.3"],
        "fc8": ["classifier.6"],
    },
    **{
        arch: {"conv1": ["conv1", "bn1"], **{f"layer{i}": [f"layer{i}"] for i in range(1, 5)},
               "fc": ["fc"]}
        for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    },
    "vit_b_16": {
        "patch_embedding": ["conv_proj", "class_token", "encoder.pos_embedding"],
        **{f"encoder_layer_{i}": [f"encoder.layers.encoder_layer_{i}"] for i in range(12)},
        "head": ["encoder.ln", "heads"],
    },
}

#: RISE masks N per backbone architecture, as in the paper's Table 1; other backbones get
#: :data:`DEFAULT_RISE_MASKS`.
RISE_MASKS: dict[str, int] = {"vgg16": 4000, "resnet50": 8000, "vit_b_16": 8000}
DEFAULT_RISE_MASKS = 4000


def backbone_architecture(backbone: object) -> str | None:
    """The architecture name in a backbone's recipe (``arch`` / ``architecture``), or None
    (also for objects that are not a :class:`~ptame.networks.frozen.Backbone`)."""
    config = getattr(backbone, "config", None) or {}
    name = config.get("arch") or config.get("architecture")
    return str(name) if name else None


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


def default_mprt_blocks(backbone: Backbone) -> dict[str, list[str]]:
    """The MPRT blocks for the backbone's architecture (:data:`MPRT_BLOCKS`), else the
    network's top-level children that hold parameters, in registration order (the forward
    order for ``nn.Sequential`` and the usual layout of other networks)."""
    arch = backbone_architecture(backbone)
    if arch in MPRT_BLOCKS:
        return {label: list(names) for label, names in MPRT_BLOCKS[arch].items()}
    children = {
        name: [name] for name, child in backbone.model.named_children()
        if any(True for _ in child.parameters())
    }
    if not children:
        raise ValueError(
            f"backbone {backbone.name!r} has no preset MPRT blocks and no sub-modules with "
            "parameters; give the blocks explicitly"
        )
    return children


def rise_masks(backbone: object) -> int:
    """RISE's N for ``backbone`` (:data:`RISE_MASKS`, else :data:`DEFAULT_RISE_MASKS`)."""
    return RISE_MASKS.get(backbone_architecture(backbone) or "", DEFAULT_RISE_MASKS)

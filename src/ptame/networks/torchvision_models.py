"""torchvision classifiers as frozen ptame networks: the ImageNet backbones and auxiliaries.

Weights come the torchvision way (a weights enum name, downloaded once into the torch hub cache)
or from a local state-dict file (``checkpoint_path``, read with ``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torchvision
from torch import Tensor, nn

from ptame.io import safe_torch_load
from ptame.networks.architectures import AUXILIARY_LAYERS
from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone, feature_extractor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision_weights(arch: str, weights: str | None) -> Any:
    if weights is None:
        return None
    return torchvision.models.get_model_weights(arch)[weights] if weights != "DEFAULT" else (
        torchvision.models.get_model_weights(arch).DEFAULT
    )


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from a local file (``weights_only=True``), unwrapping common containers.

    Accepts a raw state dict, ``{"state_dict": ...}`` or ``{"model": ...}``; strips a ``module.``
    prefix left by DataParallel/DDP.
    """
    state = safe_torch_load(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_torchvision_model(
    arch: str,
    weights: str | None = None,
    checkpoint_path: str | Path | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, str]:
    """Build a torchvision classification model and describe its weights.

    Args:
        arch: a torchvision model name, e.g. ``"resnet50"``, ``"vit_b_16"``.
        weights: a weights enum name such as ``"IMAGENET1K_V1"`` or ``"DEFAULT"`` (downloaded the
            normal torchvision way, or read from the torch hub cache), or None.
        checkpoint_path: a local state-dict file; takes precedence over ``weights``.
        num_classes: output classes when building without pretrained weights (e.g. 10 for an
            Imagenette classifier); None keeps torchvision's default.

    Returns:
        (model, weights description) where the description is used in identities.
    """
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown torchvision classification model {arch!r}; "
            f"choose one of torchvision.models.list_models()"
        )
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint_path is not None:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        state = load_state_dict_file(checkpoint_path)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"weights file {checkpoint_path} does not fit torchvision {arch!r}: {error}"
            ) from error
        return model, f"file:{Path(checkpoint_path).name}"
    model = torchvision.models.get_model(arch, weights=_torchvision_weights(arch, weights), **kwargs)
    return model, str(weights) if weights is not None else "random-init"


def torchvision_backbone(
    arch: str,
    weights: str | None = None,
    checkpoint_path: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Backbone:
    """A frozen torchvision classifier as a :class:`Backbone` (ImageNet normalisation inside)."""
    model, weights_desc = build_torchvision_model(arch, weights, checkpoint_path, num_classes)
    config = {
        "_target_": "ptame.networks.torchvision_backbone",
        "arch": arch,
        "weights": weights,
        "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
        "num_classes": num_classes,
        "mean": list(mean),
        "std": list(std),
    }
    return Backbone(model, mean, std, name=f"torchvision:{arch}:{weights_desc}", config=config)


def torchvision_auxiliary(
    arch: str,
    layers: Sequence[str] | None = None,
    weights: str | None = None,
    checkpoint_path: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> AuxiliaryFeatureExtractor:
    """A frozen torchvision CNN returning the feature maps of ``layers``.

    ``layers`` defaults to the preset for ``arch`` (:data:`AUXILIARY_LAYERS`); layer
    names are torchvision.models.feature_extraction node names.
    """
    if layers is None:
        if arch not in AUXILIARY_LAYERS:
            raise ValueError(
                f"no layer preset for auxiliary {arch!r}; give layers explicitly "
                f"(presets exist for {sorted(AUXILIARY_LAYERS)})"
            )
        layers = AUXILIARY_LAYERS[arch]
    layers = list(layers)
    model, weights_desc = build_torchvision_model(arch, weights, checkpoint_path, num_classes)
    model.eval()
    extractor = feature_extractor(model, layers, arch)
    config = {
        "_target_": "ptame.networks.torchvision_auxiliary",
        "arch": arch,
        "layers": layers,
        "weights": weights,
        "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
        "num_classes": num_classes,
        "mean": list(mean),
        "std": list(std),
    }
    return AuxiliaryFeatureExtractor(
        extractor, layers, mean, std, name=f"torchvision:{arch}:{weights_desc}", config=config
    )

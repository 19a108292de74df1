"""Frozen network wrappers: the backbone being explained and the auxiliary feature extractor.

Images enter every wrapper as float RGB in [0, 1], shape (B, 3, H, W); each wrapper applies its
own normalisation inside. Wrapped networks are frozen (no parameter requires a gradient) and stay
in eval mode whatever ``.train()`` is called with, so that Lightning cannot switch BatchNorm or
Dropout of a frozen network into training behaviour.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Feature layers used by the paper and the authors' release (reference-facts.md).
AUXILIARY_LAYER_PRESETS: dict[str, list[str]] = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v3_small": ["features.9", "features.10", "features.11", "features.12"],
    "mnasnet0_5": ["layers.13", "layers.14", "layers.15", "layers.16"],
    "resnet50": ["layer2", "layer3", "layer4"],
}


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for (B, C, H, W) images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


def check_images(images: Tensor, who: str) -> None:
    """Raise a ValueError naming ``who`` unless ``images`` is a (B, 3, H, W) floating tensor."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor of images, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{who} expects RGB images of shape (B, 3, H, W), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{who} expects float images in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters and buffers, in state_dict order.

    Computed on CPU from the raw bytes, so it is the same on every device and identifies the
    exact weights (two checkpoints of one architecture give different fingerprints).
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.float()
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


class FrozenNetwork(nn.Module):
    """Base for frozen, always-eval wrappers with a normalisation step and an identity.

    Args:
        model: the wrapped network (a module or any callable of normalised images).
        mean, std: per-channel normalisation applied to [0, 1] images before ``model``.
        name: a human-readable identity, e.g. ``"torchvision:resnet50:IMAGENET1K_V2"``.
        config: optional plain-dict recipe (Hydra ``_target_`` form) that rebuilds this wrapper;
            stored in checkpoints so that explainers can be rebuilt without the training config.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor], Any],
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, nn.Module):
            self.model = model
        else:
            self.model = _CallableModule(model)
        self.normalize = Normalize(mean, std)
        self.name = name
        self.config = config
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenNetwork:
        """Ignore ``mode``: a frozen network always stays in eval mode."""
        return super().train(False)

    def identity(self) -> dict[str, str]:
        """Name and weight fingerprint, stored in checkpoints and compared on load."""
        return {"name": self.name, "fingerprint": weights_fingerprint(self.model)}


class _CallableModule(nn.Module):
    """Adapts a plain callable ``images -> logits`` to an nn.Module (no parameters)."""

    def __init__(self, function: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.function = function

    def forward(self, images: Tensor) -> Any:
        return self.function(images)


class Backbone(FrozenNetwork):
    """The frozen classifier being explained: ``backbone(images in [0,1]) -> logits (B, C)``."""

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, f"backbone {self.name!r}")
        logits = self.model(self.normalize(images))
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"backbone {self.name!r} must return logits (B, C), got {shape}")
        return logits


class AuxiliaryFeatureExtractor(FrozenNetwork):
    """Frozen CNN returning feature maps of several layers.

    ``auxiliary(images in [0,1]) -> list of (B, c_l, h_l, w_l)`` in the order of ``layers``.
    ``model`` must return either a dict ``{layer: tensor}`` (torchvision feature extractors) or a
    list/tuple of tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, mean, std, name, config)
        if len(layers) == 0:
            raise ValueError(f"auxiliary {name!r} needs at least one feature layer")
        self.layers = list(layers)

    def forward(self, images: Tensor) -> list[Tensor]:
        check_images(images, f"auxiliary {self.name!r}")
        outputs = self.model(self.normalize(images))
        if isinstance(outputs, dict):
            return [outputs[layer] for layer in self.layers]
        return list(outputs)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "layers": list(self.layers)}


def feature_extractor(model: nn.Module, layers: Sequence[str], name: str) -> nn.Module:
    """``create_feature_extractor`` returning ``{layer: tensor}``, with a clear unknown-layer error.

    Layer names are module names (``"layer3"``) or graph node names (``"layer3.1.relu_1"``).
    """
    model.eval()
    _, eval_nodes = get_graph_node_names(model)
    known = set(eval_nodes) | {module_name for module_name, _ in model.named_modules()}
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        raise ValueError(
            f"auxiliary {name!r} has no layer(s) {unknown}; see "
            "torchvision.models.feature_extraction.get_graph_node_names or named_modules()"
        )
    return create_feature_extractor(model, return_nodes={layer: layer for layer in layers})


def _torchvision_weights(arch: str, weights: str | None) -> Any:
    if weights is None:
        return None
    return torchvision.models.get_model_weights(arch)[weights] if weights != "DEFAULT" else (
        torchvision.models.get_model_weights(arch).DEFAULT
    )


def safe_torch_load(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (no pickled code is executed), with
    errors that name ``what`` and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"could not read {what} {path}: {error}") from error


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

    ``layers`` defaults to the preset for ``arch`` (:data:`AUXILIARY_LAYER_PRESETS`); layer
    names are torchvision.models.feature_extraction node names.
    """
    if layers is None:
        if arch not in AUXILIARY_LAYER_PRESETS:
            raise ValueError(
                f"no layer preset for auxiliary {arch!r}; give layers explicitly "
                f"(presets exist for {sorted(AUXILIARY_LAYER_PRESETS)})"
            )
        layers = AUXILIARY_LAYER_PRESETS[arch]
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

"""Frozen network wrappers: the backbone being explained and the auxiliary feature extractor.

Images enter every wrapper as float RGB in [0, 1], shape (B, 3, H, W); each wrapper applies its
own normalisation inside. Wrapped networks are frozen (no parameter requires a gradient) and stay
in eval mode whatever ``.train()`` is called with, so that Lightning cannot switch BatchNorm or
Dropout of a frozen network into training behaviour.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names


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


#: values this far outside [0, 1] are accepted as float rounding (e.g. of a resize)
IMAGE_RANGE_TOLERANCE = 1e-4


def check_image_values(images: Tensor, who: str) -> None:
    """Raise a ValueError naming ``who`` unless every value of ``images`` is finite and in [0, 1]
    (up to :data:`IMAGE_RANGE_TOLERANCE`), saying what the values look like and the fix. One
    host read: for the library's entry points (explainers, metrics), not the training step."""
    if images.numel() == 0:
        return
    flat = images.detach().flatten()
    finite, low, high = torch.stack([torch.isfinite(flat).all().to(flat.dtype), flat.nan_to_num().amin(),
                                     flat.nan_to_num().amax()]).tolist()
    if not finite:
        raise ValueError(f"{who}: images contain NaN or infinite values; check the data loading and "
                         "any transform before this call")
    if low >= -IMAGE_RANGE_TOLERANCE and high <= 1 + IMAGE_RANGE_TOLERANCE:
        return
    if low >= 0 and high <= 255.5:
        hint = "they look like 0-255 pixel values: divide them by 255"
    elif low >= -1.0 - IMAGE_RANGE_TOLERANCE and high <= 1.0 + IMAGE_RANGE_TOLERANCE:
        hint = "they look like [-1, 1] values: pass (images + 1) / 2"
    else:
        hint = ("they look normalised (mean/std): pass the unnormalised [0, 1] images, ptame's network "
                "wrappers normalise inside")
    raise ValueError(f"{who}: images must be float RGB in [0, 1], got values in [{low:.4g}, {high:.4g}]; {hint}")


def as_float32_images(images: Tensor) -> Tensor:
    """float16 and float64 images as float32 (the networks' and metrics' dtype); others as they are."""
    return images.float() if images.dtype in (torch.float16, torch.float64) else images


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
            self.model = CallableModule(model)
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


class CallableModule(nn.Module):
    """Adapts a plain callable ``images -> logits`` to an nn.Module (no parameters, no named
    layers)."""

    def __init__(self, function: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.function = function

    def forward(self, images: Tensor) -> Any:
        return self.function(images)


class Backbone(FrozenNetwork):
    """The frozen classifier being explained: ``backbone(images in [0,1]) -> logits (B, C)``."""

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, f"backbone {self.name!r}")
        logits = self.model(self.normalize(as_float32_images(images)))
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"backbone {self.name!r} must return logits (B, C), got {shape}")
        return logits

    def class_count(self, images: Tensor) -> int:
        """The number of classes C of the logits (one forward of ``images[:1]`` the first time,
        remembered after it)."""
        count = self.__dict__.get("_class_count")
        if count is None:
            with torch.no_grad():  # not through forward: forward-counting hooks must not see it
                count = int(self.model(self.normalize(as_float32_images(images[:1]))).shape[1])
            self.__dict__["_class_count"] = count
        return count


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
        outputs = self.model(self.normalize(as_float32_images(images)))
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


def named_network(backbone: Backbone, who: str) -> nn.Module:
    """The raw network of ``backbone`` (``backbone.model``), whose layers can be named.

    Raises:
        TypeError: ``backbone`` is not a Backbone, wraps a plain callable, or its network has no
            sub-layers; the message names ``who`` needs it.
    """
    if not isinstance(backbone, Backbone):
        raise TypeError(f"{who} needs a ptame.networks.Backbone, got {type(backbone).__name__}")
    model = backbone.model
    if isinstance(model, CallableModule):
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

"""Grad-CAM, Grad-CAM++, Score-CAM and Ablation-CAM through the pytorch-grad-cam library.

The library is given the :class:`~ptame.networks.Backbone` itself as its model (a module taking
[0, 1] images and normalising inside) and a layer of ``backbone.model`` as target layer, so every
network call it makes passes through the Backbone wrapper: normalisation is preserved, Score-CAM's
masking happens in [0, 1] pixel space (masked pixels black, as in P-TAME), and
``ptame.metrics.cost.measure_cost`` counts the library's forward passes.

Forward passes per image (targets not given: the library's first pass provides the prediction):
Grad-CAM and Grad-CAM++ 1; Score-CAM 1 + K; Ablation-CAM 2 + K (the library repeats the plain
pass to read the unablated scores), K = channels of the target layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Literal

import torch
import tqdm
from pytorch_grad_cam import AblationCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam import ablation_cam as _ablation_cam_module
from pytorch_grad_cam import score_cam as _score_cam_module
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from ptame.explainers.base import Explainer
from ptame.maps import finite_minmax_maps
from ptame.networks.architectures import default_cam_layer
from ptame.networks.backbone_features import is_token_layer, resolve_layer, tokens_to_grid
from ptame.networks.frozen import Backbone, named_network

CAMMethod = Literal["gradcam", "gradcampp", "scorecam", "ablationcam"]
CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
}
GRADIENT_METHODS = ("gradcam", "gradcampp")


@contextlib.contextmanager
def gradient_enabled() -> Iterator[None]:
    """Autograd on, even inside ``torch.no_grad()`` or ``torch.inference_mode()`` callers."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def _silent_library_progress(enabled: bool) -> Iterator[None]:
    """Silence the tqdm bars Score-CAM and Ablation-CAM print per image (unless ``enabled``).

    The library calls ``tqdm.tqdm(...)`` through its module's ``tqdm`` name; for the duration of
    the call that name points at a namespace whose ``tqdm`` is a disabled bar.
    """
    if enabled:
        yield
        return
    silent = SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    modules = (_score_cam_module, _ablation_cam_module)
    saved = [module.tqdm for module in modules]
    try:
        for module in modules:
            module.tqdm = silent
        yield
    finally:
        for module, original in zip(modules, saved):
            module.tqdm = original


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


class CAMExplainer(TargetLayerMixin, Explainer):
    """Class activation maps of one backbone layer, computed by pytorch-grad-cam.

    Args:
        backbone: the frozen classifier (its network must have named layers).
        method: ``"gradcam"``, ``"gradcampp"``, ``"scorecam"`` or ``"ablationcam"``.
        target_layer: a ``backbone.model.named_modules()`` name; None uses the preset of
            :func:`~ptame.networks.architectures.default_cam_layer`. Token layers (B, N, C)
            are arranged on their square patch grid (class token dropped).
        batch_size: Grad-CAM / Grad-CAM++: images per call; Score-CAM / Ablation-CAM: masked
            (ablated) images per backbone forward. Score-CAM also holds K masked copies of one
            image (K x 3 x H x W floats) at a time.
        progress: show the library's per-image progress bars (Score-CAM, Ablation-CAM).

    ``explainer(images, targets=None)`` -> (B, H, W) maps in [0, 1] (per-map min-max of the
    library's output; a map that is zero everywhere stays zero). ``resolution`` is h * w of the
    target layer's maps (known after the first call).
    """

    name = "cam"

    def __init__(
        self,
        backbone: Backbone,
        method: CAMMethod = "gradcam",
        target_layer: str | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        super().__init__(backbone)
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{method}: batch_size must be a positive int, got {batch_size!r}")
        self.name = method
        self.method = method
        model = named_network(backbone, method)
        self.target_layer = target_layer or default_cam_layer(backbone, method)
        # resolved here to fail early; looked up by name later (not registered as a submodule)
        self.token_layer = is_token_layer(model, resolve_layer(model, self.target_layer, method))
        self.batch_size = batch_size
        self.progress = bool(progress)
        self._grid: tuple[int, int] | None = None

    def resolve_targets(self, images: Tensor, targets: Tensor | None) -> Tensor | None:
        """Given targets are validated; None stays None: the library explains the prediction
        of its own first forward pass (so no extra pass is spent on predicting)."""
        if targets is None:
            return None
        return super().resolve_targets(images, targets)

    def _make_cam(self, layer: nn.Module) -> BaseCAM:
        """A fresh library object for target ``layer`` (its hooks live only for one call)."""
        cls = CAM_METHODS[self.method]
        if self.method == "ablationcam":
            # a fresh ablation layer per call: the library's default instance is shared state
            ablation = AblationLayerVit() if self.token_layer else AblationLayer()
            return cls(self.backbone, [layer], reshape_transform=tokens_to_grid,
                       ablation_layer=ablation, batch_size=self.batch_size)
        cam = cls(self.backbone, [layer], reshape_transform=tokens_to_grid)
        cam.batch_size = self.batch_size  # Score-CAM reads it; harmless for Grad-CAM(++)
        return cam

    def _run(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """Library maps (b, H, W) as a tensor for one chunk of images."""
        layer = self._layer  # held here: Ablation-CAM swaps it out of the network meanwhile
        cam = self._make_cam(layer)
        wanted = None if targets is None else [ClassifierOutputTarget(int(c)) for c in targets]
        try:
            if self.method in GRADIENT_METHODS:
                with gradient_enabled():
                    # the backbone is frozen: gradients flow only if the input requires them
                    inputs = images.detach().clone().requires_grad_(True)
                    maps = cam(inputs, wanted)
            else:
                with torch.no_grad(), _silent_library_progress(self.progress):
                    maps = cam(images.detach(), wanted)
            activations = cam.activations_and_grads.activations
            if activations:
                self._grid = tuple(int(s) for s in activations[0].shape[-2:])
        finally:
            cam.activations_and_grads.release()
            if self.method == "ablationcam":
                # the library swaps the target layer out during ablation: make sure it is back
                replace_layer_recursive(self.backbone, cam.ablation_layer, layer)
        return torch.from_numpy(maps)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        # Score-CAM materialises K masked copies per image: one image at a time bounds memory
        chunk = self.batch_size if self.method in GRADIENT_METHODS else 1
        pieces = []
        for start in range(0, images.shape[0], chunk):
            part = None if targets is None else targets[start : start + chunk]
            pieces.append(self._run(images[start : start + chunk], part))
        maps = torch.cat(pieces).to(device=images.device)
        return finite_minmax_maps(maps)

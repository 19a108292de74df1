"""Opti-CAM (Zhang et al., CVIU 2024): saliency maps optimised per image.

With A_k (h, w) the K feature maps of a target layer of the backbone, the saliency map is

    S(u) = n(up(sum_k softmax(u)_k A_k)),   n = per-map min-max to [0, 1], up = bilinear,

and the channel weights u (K,) of each image are optimised with Adam to maximise the backbone's
score of the target class on the masked image x * S(u) (logit by default, or softmax
probability). u starts at 0 (uniform weights). Images of a chunk are optimised together (their
objectives are summed; Adam acts per coordinate, so each image follows its own trajectory).

Forward passes per image: 1 (features and prediction) + ``iterations``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ptame.explainers.base import Explainer
from ptame.explainers.cam import TargetLayerMixin, gradient_enabled
from ptame.maps import finite_minmax_maps
from ptame.networks.architectures import default_cam_layer
from ptame.networks.backbone_features import resolve_layer, tokens_to_grid
from ptame.networks.frozen import Backbone, named_network

Score = Literal["logit", "softmax"]


def combine_maps(features: Tensor, weights: Tensor, size: tuple[int, int]) -> Tensor:
    """S = n(up(sum_k softmax(weights)_k A_k)), differentiable in ``weights``.

    Args:
        features: A, (B, K, h, w).
        weights: u, (B, K) unnormalised channel weights.
        size: (H, W) of the images.

    Returns:
        (B, H, W) maps in [0, 1] (a constant map becomes 0).
    """
    combined = torch.einsum("bk,bkhw->bhw", weights.softmax(dim=1), features)
    upsampled = F.interpolate(combined[:, None], size=size, mode="bilinear",
                              align_corners=False)[:, 0]
    flat = upsampled.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    return ((flat - low) / (span + 1e-8)).view_as(upsampled)


class OptiCAMExplainer(TargetLayerMixin, Explainer):
    """Opti-CAM saliency maps, optimised per image.

    Args:
        backbone: the frozen classifier (its network must have named layers).
        target_layer: a ``backbone.model.named_modules()`` name; None uses the CAM preset
            (:func:`~ptame.networks.architectures.default_cam_layer`).
        iterations: Adam steps per image (the paper: 50).
        lr: Adam learning rate (the paper: 0.1).
        score: objective, ``"logit"`` of the target class or its ``"softmax"`` probability.
        batch_size: images optimised together (memory bound: one forward and backward of this
            many images per step).

    After a call, ``objective_history`` holds the objective (iterations, B) at every step, the
    score of x * S(u) before that step's update.
    """

    name = "opticam"

    def __init__(
        self,
        backbone: Backbone,
        target_layer: str | None = None,
        iterations: int = 50,
        lr: float = 0.1,
        score: Score = "logit",
        batch_size: int = 32,
    ) -> None:
        super().__init__(backbone)
        for label, value in (("iterations", iterations), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"opticam: {label} must be a positive int, got {value!r}")
        if not float(lr) > 0:
            raise ValueError(f"opticam: lr must be positive, got {lr!r}")
        if score not in ("logit", "softmax"):
            raise ValueError(f"opticam: score must be 'logit' or 'softmax', got {score!r}")
        model = named_network(backbone, "opticam")
        self.target_layer = target_layer or default_cam_layer(backbone, "opticam")
        resolve_layer(model, self.target_layer, "opticam")  # fail early on unknown names
        self.iterations = iterations
        self.lr = float(lr)
        self.score = score
        self.batch_size = batch_size
        self._grid: tuple[int, int] | None = None
        self.objective_history: Tensor | None = None

    def resolve_targets(self, images: Tensor, targets: Tensor | None) -> Tensor | None:
        """None stays None: the feature pass also gives the prediction (no extra pass)."""
        if targets is None:
            return None
        return super().resolve_targets(images, targets)

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """One backbone pass: target-layer maps A (B, K, h, w) and logits (B, C), no gradient."""
        captured: list[Tensor] = []
        handle = self._layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.no_grad():
                logits = self.backbone(images)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"opticam: target layer {self.target_layer!r} was not called")
        features = tokens_to_grid(captured[0]).detach().float()
        if features.ndim != 4:
            raise ValueError(
                f"opticam: target layer {self.target_layer!r} gives shape "
                f"{tuple(captured[0].shape)}, expected maps (B, K, h, w) or tokens (B, N, K)"
            )
        return features, logits

    def _objective(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Score of each image's target class, (B,)."""
        if self.score == "softmax":
            logits = logits.float().softmax(dim=1)
        return logits.gather(1, targets.view(-1, 1))[:, 0].float()

    def _optimise(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Maps (b, H, W) and objective history (iterations, b) for one chunk."""
        features, logits = self.features_and_logits(images)
        self._grid = (int(features.shape[-2]), int(features.shape[-1]))
        targets = logits.argmax(dim=1) if targets is None else targets
        size = (images.shape[-2], images.shape[-1])
        history = []
        with gradient_enabled():
            # leaf tensors created with autograd on (the caller may be in no_grad / inference)
            images = images.detach().clone()
            features = features.clone()
            targets = targets.clone()  # gather saves its index for the backward pass
            weights = torch.zeros(features.shape[:2], device=images.device, requires_grad=True)
            optimiser = torch.optim.Adam([weights], lr=self.lr)
            for _ in range(self.iterations):
                maps = combine_maps(features, weights, size)
                scores = self._objective(self.backbone(images * maps[:, None].to(images.dtype)),
                                         targets)
                optimiser.zero_grad(set_to_none=True)
                (-scores.sum()).backward()
                optimiser.step()
                history.append(scores.detach())
            with torch.no_grad():
                maps = combine_maps(features, weights, size)
        return maps.detach(), torch.stack(history)

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        pieces, histories = [], []
        for start in range(0, images.shape[0], self.batch_size):
            part = None if targets is None else targets[start : start + self.batch_size]
            maps, history = self._optimise(images[start : start + self.batch_size], part)
            pieces.append(maps)
            histories.append(history)
        self.objective_history = torch.cat(histories, dim=1)
        return finite_minmax_maps(torch.cat(pieces).to(images.device))

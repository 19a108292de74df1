"""P-TAME behind the explainer interface, and loading it from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ptame.checkpoint import (
    attention_state,
    is_backbone_features_checkpoint,
    read_checkpoint,
    rebuild_auxiliary,
    rebuild_backbone,
    verify_metadata,
)
from ptame.explainers.base import Explainer
from ptame.maps import upsample_maps
from ptame.model import PTAME, MapNormalisation, normalise_scores
from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone


class PTAMEExplainer(Explainer):
    """Explanations from a trained P-TAME model in one forward pass.

    One backbone forward (only when targets are not given) and one auxiliary forward per batch;
    only the maps of the requested classes are computed.

    Args:
        model: a (trained) :class:`ptame.model.PTAME`.
        map_normalisation: ``"sigmoid"`` (paper) or ``"minmax"`` (the release at evaluation).
    """

    name = "ptame"
    has_trained_head = True

    def __init__(self, model: PTAME, map_normalisation: MapNormalisation = "sigmoid") -> None:
        super().__init__(model.backbone)
        self.model = model
        self.map_normalisation: MapNormalisation = map_normalisation
        normalise_scores(torch.zeros(1, 1, 1), map_normalisation)  # validates the name early

    @property
    def resolution(self) -> int:
        """R = h * w of the maps before upsampling."""
        return self.model.resolution

    def low_resolution_maps(self, images: Tensor, targets: Tensor) -> Tensor:
        """(B, h, w) maps in [0, 1] for ``targets`` at the explanation resolution.

        The attention always runs in eval mode here (BatchNorm uses its running statistics and
        is not updated), even while the module that owns it is training.
        """
        attention = self.model.attention
        was_training = attention.training
        attention.eval()
        try:
            scores = self.model.class_scores(images, targets.view(-1, 1))
        finally:
            attention.train(was_training)
        return normalise_scores(scores[:, 0], self.map_normalisation)

    @torch.no_grad()  # maps are results, not a graph: no autograd memory when called outside no_grad
    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        assert targets is not None  # P-TAME always has a backbone
        maps = self.low_resolution_maps(images, targets)
        return upsample_maps(maps, images.shape[-2:]).clamp(0, 1)


def load_explainer(
    checkpoint_path: str | Path,
    backbone: Backbone | None = None,
    auxiliary: AuxiliaryFeatureExtractor | None = None,
    map_normalisation: MapNormalisation = "sigmoid",
    strict_weights: bool = True,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> PTAMEExplainer:
    """Rebuild a trained P-TAME (or T-TAME) explainer from a checkpoint.

    Args:
        checkpoint_path: a ``.ckpt`` written by P-TAME training.
        backbone: the frozen classifier it was trained to explain; None rebuilds it from the
            recipe stored in the checkpoint.
        auxiliary: the auxiliary feature extractor; None rebuilds it from the stored recipe (in
            T-TAME mode: over ``backbone``'s own layers).
        map_normalisation: see :class:`PTAMEExplainer`.
        strict_weights: refuse a backbone/auxiliary whose weights differ from training.
        device: where the explainer is placed.
        cache_dir: replaces the ``cache_dir`` of the stored recipes (the generated-dataset
            classifiers' cache on this machine).

    Raises:
        CheckpointMismatchError: the checkpoint was trained for another backbone or auxiliary.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    saved = checkpoint["ptame"]
    if backbone is None:
        backbone = rebuild_backbone(saved, checkpoint_path, cache_dir)
    if auxiliary is None:
        auxiliary = rebuild_auxiliary(saved, checkpoint_path, backbone, cache_dir)
    model = PTAME(
        backbone,
        auxiliary,
        input_size=saved["input_size"],
        activation=saved.get("activation", "relu"),
        upsampling=saved.get("upsampling", "one_step"),  # checkpoints before it was stored: one step
    )
    verify_metadata(saved, model, strict_weights=strict_weights)
    model.attention.load_state_dict(attention_state(checkpoint))
    explainer = PTAMEExplainer(model, map_normalisation)
    if is_backbone_features_checkpoint(saved):
        explainer.name = "ttame"
    return explainer.to(device).eval()

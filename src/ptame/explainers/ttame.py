"""T-TAME mode: P-TAME whose feature maps come from the backbone itself (Table 2, "ResNet-50").

Training uses ``auxiliary=from_backbone`` (:func:`~ptame.explainers.target_layers.
backbone_auxiliary`); explaining rebuilds that auxiliary over the backbone being explained and
loads the checkpoint through :func:`ptame.explainers.load_explainer` (which refuses a checkpoint
trained for another backbone, other weights or other layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ptame.checkpoint import read_checkpoint
from ptame.explainers.ptame import PTAMEExplainer, load_explainer
from ptame.explainers.target_layers import backbone_auxiliary
from ptame.model import MapNormalisation
from ptame.networks import Backbone


def load_ttame_explainer(
    checkpoint_path: str | Path | None,
    backbone: Backbone,
    layers: Sequence[str] | None = None,
    map_normalisation: MapNormalisation = "sigmoid",
    strict_weights: bool = True,
) -> PTAMEExplainer:
    """A trained T-TAME explainer for ``backbone`` (feature maps from the backbone's layers).

    Args:
        checkpoint_path: ``<run>/checkpoints/last.ckpt`` of a run trained with
            ``auxiliary=from_backbone`` (e.g. ``experiment=table2_ttame_resnet50``).
        backbone: the frozen classifier it was trained to explain (named layers needed).
        layers: backbone layers of the features; None uses those stored in the checkpoint.
        map_normalisation: ``"sigmoid"`` (paper) or ``"minmax"`` (the release at evaluation).
        strict_weights: refuse a backbone whose weights differ from training.

    Returns:
        A :class:`~ptame.explainers.PTAMEExplainer` named ``"ttame"``: (B, 3, H, W) in [0, 1]
        -> (B, H, W) maps in [0, 1].
    """
    if not checkpoint_path:
        raise ValueError(
            "explainer 'ttame' needs a T-TAME checkpoint: ttame_ckpt_path=<run>/checkpoints/"
            "last.ckpt (a run trained with auxiliary=from_backbone, e.g. "
            "experiment=table2_ttame_resnet50)"
        )
    if layers is None:
        saved = read_checkpoint(checkpoint_path)["ptame"]["auxiliary"]
        if not str(saved.get("name", "")).startswith("backbone-features:"):
            raise ValueError(
                f"{checkpoint_path} was not trained in T-TAME mode (its auxiliary is "
                f"{saved.get('name')!r}, not the backbone's own features); use the 'ptame' "
                "explainer for it"
            )
        layers = saved.get("layers")
    auxiliary = backbone_auxiliary(backbone, layers)
    explainer = load_explainer(checkpoint_path, backbone, auxiliary=auxiliary,
                               map_normalisation=map_normalisation,
                               strict_weights=strict_weights)
    explainer.name = "ttame"
    return explainer

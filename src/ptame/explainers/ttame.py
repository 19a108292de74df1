"""T-TAME mode: P-TAME whose feature maps come from the backbone itself (Table 2, "ResNet-50").

Training uses ``auxiliary=from_backbone`` (:func:`~ptame.networks.backbone_auxiliary`);
explaining rebuilds that auxiliary over the backbone being explained and loads the checkpoint
through :func:`ptame.explainers.load_explainer` (which refuses a checkpoint trained for another
backbone, other weights or other layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ptame.checkpoint import is_backbone_features_checkpoint, read_checkpoint, rebuild_backbone
from ptame.explainers.ptame import PTAMEExplainer, load_explainer
from ptame.model import MapNormalisation
from ptame.networks.backbone_features import backbone_auxiliary
from ptame.networks.frozen import Backbone


def load_ttame_explainer(
    checkpoint_path: str | Path | None,
    backbone: Backbone | None = None,
    layers: Sequence[str] | None = None,
    map_normalisation: MapNormalisation = "sigmoid",
    strict_weights: bool = True,
) -> PTAMEExplainer:
    """A trained T-TAME explainer (feature maps from the backbone's layers).

    Args:
        checkpoint_path: ``<run>/checkpoints/last.ckpt`` of a run trained with
            ``auxiliary=from_backbone`` (e.g. ``experiment=table2_ttame_resnet50``).
        backbone: the frozen classifier it was trained to explain (named layers needed); None
            rebuilds it from the recipe stored in the checkpoint.
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
    saved = read_checkpoint(checkpoint_path)["ptame"]
    if not is_backbone_features_checkpoint(saved):
        raise ValueError(
            f"{checkpoint_path} was not trained in T-TAME mode (its auxiliary is "
            f"{saved['auxiliary'].get('name')!r}, not the backbone's own features); use the "
            "'ptame' explainer for it"
        )
    if backbone is None:
        backbone = rebuild_backbone(saved, checkpoint_path)
    auxiliary = None if layers is None else backbone_auxiliary(backbone, layers)
    explainer = load_explainer(checkpoint_path, backbone, auxiliary=auxiliary,
                               map_normalisation=map_normalisation,
                               strict_weights=strict_weights)
    explainer.name = "ttame"
    return explainer

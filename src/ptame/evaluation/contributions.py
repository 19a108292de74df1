"""Layer contributions (Table 2, bottom rows): how much of the trained fusion module belongs to
each auxiliary layer's feature branch.

The paper computes them "by processing the fusion module's trained weights and grouping them
based on which feature branch they correspond to". We use the share of the fusion weights'
absolute mass, ``sum_{c, k in branch l} |W[c, k]| / sum_{c, k} |W[c, k]|``
(:meth:`ptame.attention.AttentionMechanism.layer_contributions`). The paper's published values
agree with this reading: for all four auxiliaries of Table 2 they lie within 0.7 percentage
points of each branch's share of the fused channels (ResNet-18: 64/128/256/512 of 960 channels,
6.67/13.33/26.67/53.33 %, published 6.73/13.44/26.68/53.15 %), which is what the absolute-mass
share gives when the trained weights have similar magnitudes on every channel; signed sums
would not be shares.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ptame.attention import AttentionMechanism

#: results.json key prefix: ``layer_contribution/<auxiliary layer>``.
CONTRIBUTION_PREFIX = "layer_contribution/"


def layer_contributions(explainer: nn.Module) -> dict[str, float] | None:
    """``{auxiliary layer: share}`` (shares sum to 1) of a P-TAME-like explainer, else None.

    Args:
        explainer: any explainer; those with ``model.attention`` (an
            :class:`~ptame.attention.AttentionMechanism`) and ``model.auxiliary.layers`` (P-TAME,
            T-TAME) have contributions.
    """
    model = getattr(explainer, "model", None)
    attention = getattr(model, "attention", None)
    if not isinstance(attention, AttentionMechanism):
        return None
    shares = attention.layer_contributions()
    layers = list(getattr(getattr(model, "auxiliary", None), "layers", None) or [])
    if len(layers) != len(shares):
        # unnamed feature levels: number them as the paper's "Layer 1..n"
        layers = [f"layer{index + 1}" for index in range(len(shares))]
    return dict(zip(layers, shares, strict=True))


def contribution_figures(explainers: Mapping[str, nn.Module]) -> dict[str, dict[str, float]]:
    """``{method: {"layer_contribution/<layer>": share}}`` for the explainers that have them."""
    figures = {}
    for name, explainer in explainers.items():
        shares = layer_contributions(explainer)
        if shares is not None:
            figures[name] = {CONTRIBUTION_PREFIX + layer: share for layer, share in shares.items()}
    return figures


def format_layer_contributions(figures: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of :func:`contribution_figures`: one line per method and layer, in %."""
    lines = ["Layer contributions (share of the fusion weights' absolute mass per auxiliary layer):"]
    for method, shares in figures.items():
        for key, share in shares.items():
            lines.append(f"  {method:<16}{key[len(CONTRIBUTION_PREFIX):]:<20}{100 * share:7.2f}%")
    return "\n".join(lines)

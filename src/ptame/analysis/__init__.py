"""Analyses on top of the evaluation: the LaTeX comparison table, the layer contributions of
the attention's fusion weights (Table 2), the model parameter randomisation test (Fig. 5) and
the explanation figures (Fig. 4, 6, 7)."""

from ptame.analysis.contributions import (
    CONTRIBUTION_PREFIX,
    format_layer_contributions,
    layer_contributions,
)
from ptame.analysis.latex import METRIC_DIRECTIONS, latex_table, write_latex_table

__all__ = [
    "CONTRIBUTION_PREFIX",
    "METRIC_DIRECTIONS",
    "format_layer_contributions",
    "latex_table",
    "layer_contributions",
    "write_latex_table",
]

"""Evaluation metrics. Each is a torchmetrics ``Metric`` that runs batch-wise on the images'
device, keeps one value per image (by dataset index) and gives the same number on 1 or N
processes; each names the direction in which its figures are better (:func:`metric_direction`)."""

from ptame.metrics.base import lookup_direction
from ptame.metrics.confidence import AverageDropIncrease
from ptame.metrics.cost import ExplainerCost, measure_cost
from ptame.metrics.imputation import noisy_linear_imputation
from ptame.metrics.insertion_deletion import InsertionDeletion
from ptame.metrics.localisation import (
    ClassSpecificLocalisation,
    EnergyPointingGame,
    PointingGame,
    scaled_pointing_tolerance,
)
from ptame.metrics.road import ROAD, curve_auc

#: every kind of figure ptame reports, each with its ``directions``
REPORTED_FIGURES = (AverageDropIncrease, ROAD, InsertionDeletion, PointingGame, EnergyPointingGame,
                    ClassSpecificLocalisation, ExplainerCost)


def metric_direction(key: str) -> str | None:
    """``"min"`` (lower is better), ``"max"`` or None for a result key such as ``"AD@15"``,
    ``"ROAD_LeRF_AUC"`` or ``"ms_per_image"``, from the metric that computes it."""
    for figure in REPORTED_FIGURES:
        direction = lookup_direction(figure.directions, key)
        if direction is not None:
            return direction
    return None


__all__ = [
    "REPORTED_FIGURES",
    "ROAD",
    "AverageDropIncrease",
    "ClassSpecificLocalisation",
    "EnergyPointingGame",
    "ExplainerCost",
    "InsertionDeletion",
    "PointingGame",
    "curve_auc",
    "measure_cost",
    "metric_direction",
    "noisy_linear_imputation",
    "scaled_pointing_tolerance",
]

"""Evaluation metrics. Each is a torchmetrics ``Metric`` that runs batch-wise on the images'
device, keeps one value per image (by dataset index) and gives the same number on 1 or N
processes."""

from ptame.metrics.confidence import AverageDropIncrease
from ptame.metrics.cost import ExplainerCost, measure_cost
from ptame.metrics.insertion_deletion import InsertionDeletion
from ptame.metrics.localisation import EnergyPointingGame, PointingGame, scaled_pointing_tolerance
from ptame.metrics.imputation import noisy_linear_imputation
from ptame.metrics.road import ROAD, curve_auc


__all__ = [
    "ROAD",
    "AverageDropIncrease",
    "EnergyPointingGame",
    "ExplainerCost",
    "InsertionDeletion",
    "PointingGame",
    "curve_auc",
    "measure_cost",
    "noisy_linear_imputation",
    "scaled_pointing_tolerance",
]

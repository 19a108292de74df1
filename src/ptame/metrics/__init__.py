"""Evaluation metrics; each is a torchmetrics ``Metric`` that runs on the images' device."""

from ptame.metrics.localisation import EnergyPointingGame, PointingGame

__all__ = ["EnergyPointingGame", "PointingGame"]

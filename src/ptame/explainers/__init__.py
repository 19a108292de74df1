"""Explainers: every one maps ``(images (B,3,H,W) in [0,1], targets (B,) | None)`` to maps
(B, H, W) in [0, 1]; targets default to the backbone's predictions."""

from ptame.explainers.base import Explainer
from ptame.explainers.baselines import CentreGaussianExplainer, RandomExplainer
from ptame.explainers.ptame import PTAMEExplainer, load_explainer

__all__ = [
    "CentreGaussianExplainer",
    "Explainer",
    "PTAMEExplainer",
    "RandomExplainer",
    "load_explainer",
]

"""Explainers: every one maps ``(images (B,3,H,W) in [0,1], targets (B,) | None)`` to maps
(B, H, W) in [0, 1]; targets default to the backbone's predictions."""

from ptame.explainers.aise import AISEExplainer
from ptame.explainers.base import Explainer
from ptame.explainers.baselines import CentreGaussianExplainer, RandomExplainer
from ptame.explainers.cam import CAMExplainer
from ptame.explainers.ensemble import EnsembleExplainer
from ptame.explainers.lots import LOTSExplainer
from ptame.explainers.opticam import OptiCAMExplainer
from ptame.explainers.ptame import PTAMEExplainer, load_explainer
from ptame.explainers.rise import RISEExplainer
from ptame.explainers.ttame import load_ttame_explainer

__all__ = [
    "AISEExplainer",
    "CAMExplainer",
    "CentreGaussianExplainer",
    "EnsembleExplainer",
    "Explainer",
    "LOTSExplainer",
    "OptiCAMExplainer",
    "PTAMEExplainer",
    "RISEExplainer",
    "RandomExplainer",
    "load_explainer",
    "load_ttame_explainer",
]

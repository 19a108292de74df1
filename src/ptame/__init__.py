"""ptame: train, tune and evaluate P-TAME explanations for any image classifier.

Images flow as float RGB in [0, 1], shape (B, 3, H, W); every network wrapper normalises inside.
Every explainer maps ``(images, targets=None)`` to (B, H, W) maps in [0, 1].
"""

from ptame.explainers import Explainer, PTAMEExplainer, load_explainer
from ptame.losses import PTAMELoss
from ptame.model import PTAME
from ptame.networks import AuxiliaryFeatureExtractor, Backbone, torchvision_auxiliary, torchvision_backbone

__version__ = "0.1.0"

__all__ = [
    "PTAME",
    "AuxiliaryFeatureExtractor",
    "Backbone",
    "Explainer",
    "PTAMEExplainer",
    "PTAMELoss",
    "load_explainer",
    "torchvision_auxiliary",
    "torchvision_backbone",
]

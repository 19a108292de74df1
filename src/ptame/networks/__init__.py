"""Frozen networks: the backbone being explained, the auxiliary feature extractor, and the
factories that build them (torchvision models, the backbone's own layers in T-TAME mode, the
small generated-dataset classifiers in :mod:`ptame.data.generated_classifiers`).

The factories' import paths here (``ptame.networks.torchvision_backbone``, ...) are the
``_target_`` strings of the configs and of the recipes stored in checkpoints.
"""

from ptame.networks.backbone_features import backbone_auxiliary
from ptame.networks.frozen import (
    AuxiliaryFeatureExtractor,
    Backbone,
    FrozenNetwork,
    Normalize,
    check_images,
    weights_fingerprint,
)
from ptame.networks.torchvision_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_state_dict_file,
    torchvision_auxiliary,
    torchvision_backbone,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AuxiliaryFeatureExtractor",
    "Backbone",
    "FrozenNetwork",
    "Normalize",
    "backbone_auxiliary",
    "check_images",
    "load_state_dict_file",
    "torchvision_auxiliary",
    "torchvision_backbone",
    "weights_fingerprint",
]

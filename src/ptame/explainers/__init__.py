"""Explainers: every one maps ``(images (B,3,H,W) in [0,1], targets (B,) | None)`` to maps
(B, H, W) in [0, 1]; targets default to the backbone's predictions.

The baselines are imported on first access (PEP 562), so that ``import ptame`` does not pay
for pytorch-grad-cam, OpenCV and Lightning when only P-TAME is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ptame.explainers.base import Explainer
from ptame.explainers.ptame import PTAMEExplainer, load_explainer

#: public name -> submodule that defines it, imported on first access
_LAZY_EXPLAINERS: dict[str, str] = {
    "AISEExplainer": "ptame.explainers.aise",
    "CAMExplainer": "ptame.explainers.cam",
    "CentreGaussianExplainer": "ptame.explainers.baselines",
    "EnsembleExplainer": "ptame.explainers.ensemble",
    "LOTSExplainer": "ptame.explainers.lots",
    "OptiCAMExplainer": "ptame.explainers.opticam",
    "RISEExplainer": "ptame.explainers.rise",
    "RandomExplainer": "ptame.explainers.baselines",
    "SobelEdgeExplainer": "ptame.explainers.baselines",
    "load_ttame_explainer": "ptame.explainers.ttame",
}

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
    "SobelEdgeExplainer",
    "load_explainer",
    "load_ttame_explainer",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPLAINERS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPLAINERS))

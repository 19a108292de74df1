"""Tiny frozen networks that build in milliseconds, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from ptame.networks import AuxiliaryFeatureExtractor, Backbone


class TinyClassifier(nn.Module):
    """conv-pool-linear classifier: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyPyramid(nn.Module):
    """Three feature levels at strides 2, 4 and 8 (odd sizes for odd inputs): list output."""

    def __init__(self) -> None:
        super().__init__()
        self.level1 = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.level2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Dropout(0.5), nn.ReLU())
        self.level3 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.level1(x)
        second = self.level2(first)
        return [first, second, self.level3(second)]


def make_backbone(num_classes: int = 5, seed: int = 0, name: str = "tiny-classifier") -> Backbone:
    torch.manual_seed(seed)
    return Backbone(TinyClassifier(num_classes), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), name=name)


def make_auxiliary(seed: int = 1, name: str = "tiny-pyramid") -> AuxiliaryFeatureExtractor:
    torch.manual_seed(seed)
    return AuxiliaryFeatureExtractor(
        TinyPyramid(), ["level1", "level2", "level3"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), name=name
    )

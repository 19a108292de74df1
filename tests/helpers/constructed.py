"""A classifier whose class evidence lies in known image regions, for localisation tests.

``two_colour_backbone()`` computes, on a 4-px grid, channel 0 = ReLU(mean(red - blue)) and
channel 1 = ReLU(mean(blue - red)) (layer ``features``, (B, 2, H/4, W/4)), averages them to
(a0, a1) and returns logits (5 + 10 (a0 - a1), 5 + 10 (a1 - a0)): red evidence supports class 0
and counts against class 1, blue the opposite. Logits stay positive (Ablation-CAM divides by
the unablated score).

``two_colour_image()`` is grey (red = blue: no evidence) with a red square R (class 0) and a
smaller blue square Q (class 1), both aligned to the 4-px grid, so the prediction is class 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ptame.networks import Backbone

SIZE = 32
RED = (slice(4, 16), slice(4, 16))  # rows, columns of R (3 x 3 grid cells)
BLUE = (slice(20, 28), slice(20, 28))  # rows, columns of Q (2 x 2 grid cells)
SCALE, BIAS = 10.0, 5.0


class TwoColourClassifier(nn.Module):
    """(B, 3, H, W) -> logits (B, 2); evidence maps in ``features`` (B, 2, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0], conv.weight[0, 2] = 1 / 16, -1 / 16
            conv.weight[1, 2], conv.weight[1, 0] = 1 / 16, -1 / 16
        self.features = nn.Sequential(conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[SCALE, -SCALE], [-SCALE, SCALE]]))
            self.fc.bias.fill_(BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def two_colour_backbone() -> Backbone:
    """The constructed classifier, identity normalisation (it sees [0, 1] pixels)."""
    return Backbone(TwoColourClassifier(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name="two-colour")


def two_colour_image(batch: int = 1) -> torch.Tensor:
    """(batch, 3, 32, 32): grey, red square R, blue square Q."""
    image = torch.full((3, SIZE, SIZE), 0.5)
    image[:, RED[0], RED[1]] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    image[:, BLUE[0], BLUE[1]] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    return image.expand(batch, -1, -1, -1).clone()


def region_mask(region: tuple[slice, slice]) -> torch.Tensor:
    """Boolean (32, 32) mask of a region."""
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[region] = True
    return mask


def peak_in(saliency: torch.Tensor, region: tuple[slice, slice]) -> bool:
    """Whether the maximum of a (H, W) map lies inside ``region``."""
    row, col = divmod(int(saliency.flatten().argmax()), saliency.shape[-1])
    return bool(region_mask(region)[row, col])

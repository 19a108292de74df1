"""Small classifiers for 64 px images (the generated dataset): plain torchvision-style modules.

Both take normalised images (B, 3, H, W) and return logits (B, num_classes); their stages are
named ``stem``, ``layer1`` .. ``layer4``, ``pool``, ``fc`` so that feature layers, CAM target
layers and MPRT blocks can be named alike (presets in :mod:`ptame.networks.architectures`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def small_vgg(num_classes: int) -> nn.Module:
    """A plain VGG-style CNN (about 0.14 M parameters) for small images.

    Stages (for a 64 px input): ``stem`` conv stride 2 (16 ch, 32 px), ``layer1`` (32 ch, 32 px),
    ``layer2`` (64 ch, 16 px), ``layer3`` (64 ch, 8 px), ``layer4`` (128 ch, 4 px), then global
    max pooling (the objects are small: max pooling learns much faster than average pooling)
    and a linear classifier. Input: normalised images (B, 3, H, W); output: logits
    (B, num_classes).
    """
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(*_conv_bn_relu(3, 16, stride=2)),
            layer1=nn.Sequential(*_conv_bn_relu(16, 32)),
            layer2=nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(32, 64)),
            layer3=nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(64, 64)),
            layer4=nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(64, 128)),
            pool=nn.AdaptiveMaxPool2d(1),
            flatten=nn.Flatten(1),
            fc=nn.Linear(128, num_classes),
        )
    )


class SmallResNet(nn.Module):
    """A small ResNet of torchvision BasicBlocks, one block per stage (about 0.31 M parameters).

    For a 64 px input: ``stem`` conv stride 2 (16 ch, 32 px), ``layer1`` (16 ch, 32 px),
    ``layer2`` (32 ch, 16 px), ``layer3`` (64 ch, 8 px), ``layer4`` (128 ch, 4 px), global
    max pooling (``pool``), ``fc``. Stages 2-4 downsample with a 2x2 max pooling before a
    stride-1 block: on these small objects, stride-2 blocks learned several times slower.
    Input: normalised images (B, 3, H, W); output: logits (B, num_classes).
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, widths[0], stride=2))
        self.layer1 = _basic_block(widths[0], widths[0])
        self.layer2 = nn.Sequential(nn.MaxPool2d(2), _basic_block(widths[0], widths[1]))
        self.layer3 = nn.Sequential(nn.MaxPool2d(2), _basic_block(widths[1], widths[2]))
        self.layer4 = nn.Sequential(nn.MaxPool2d(2), _basic_block(widths[2], widths[3]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)  # PyTorch default init (learned faster)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _basic_block(c_in: int, c_out: int) -> BasicBlock:
    """A stride-1 torchvision BasicBlock; a 1x1 conv + BN projects the shortcut if needed."""
    downsample = None
    if c_in != c_out:
        downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
    return BasicBlock(c_in, c_out, downsample=downsample)


def small_resnet(num_classes: int) -> nn.Module:
    """A :class:`SmallResNet` (widths 16/32/64/128, about 0.31 M parameters)."""
    return SmallResNet(num_classes)


#: Constructors by architecture name: ``SMALL_NETWORKS[name](num_classes) -> nn.Module``.
SMALL_NETWORKS: dict[str, Callable[[int], nn.Module]] = {
    "small_vgg": small_vgg,
    "small_resnet": small_resnet,
}

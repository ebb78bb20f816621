"""ResNet-18 with a configurable base width, parameter names and layout as torchvision's ``resnet18``.

At ``width=64`` it is torchvision's network (a torchvision state dict loads as it is and gives the same outputs);
smaller widths scale every stage's channels (``width``, 2x, 4x, 8x), which keeps the depth, the residual structure
and BatchNorm of the paper's CIFAR-10 model at a cost a CPU can train on the full Fashion-MNIST set.
torchvision's own ``BasicBlock`` refuses any base width other than 64, hence this module.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Stem = Literal["imagenet", "cifar"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a strided 1x1 convolution when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()  # not in place: the ghost engine's tensor hooks need each layer's output intact
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18: a stem, four stages of two ``BasicBlock``s (channels width x 1, 2, 4, 8), pooling, a linear head.

    ``stem="imagenet"``: 7x7 stride-2 convolution and max-pooling (torchvision's); ``stem="cifar"``: a 3x3 stride-1
    convolution and no pooling, the usual variant for 32x32 (and 28x28) images.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, width: int = 64, stem: Stem = "imagenet"):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive number of channels, got {width}")
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._stage(width, channels[0], stride=1)
        self.layer2 = self._stage(channels[0], channels[1], stride=2)
        self.layer3 = self._stage(channels[1], channels[2], stride=2)
        self.layer4 = self._stage(channels[2], channels[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        self._initialise()

    @staticmethod
    def _stage(in_channels: int, out_channels: int, *, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, out_channels, stride=stride), BasicBlock(out_channels, out_channels)
        )

    def _initialise(self) -> None:
        """torchvision's initialisation: Kaiming-normal convolutions, BatchNorm at weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

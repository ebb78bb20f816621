"""A small CNN for 8x8 digits and 28x28 Fashion-MNIST: the CPU stand-in for the paper's ResNet18."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["group", "batch", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(num_groups=4, num_channels=channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch' or 'none', got {kind!r}")


class SmallCNN(nn.Module):
    """Two conv blocks, adaptive pooling to 4x4, and a two-layer classifier head.

    ``norm="group"`` (default) keeps every sample independent, which per-sample gradients like; ``"batch"`` is
    supported and runs in eval mode during unlearning.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: int = 16, norm: Norm = "group") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            _norm(norm, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            _norm(norm, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

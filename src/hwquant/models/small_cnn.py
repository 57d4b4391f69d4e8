"""A tiny CNN for fast tests: trains in seconds on 8×8 digits.

``conv1(16) -> bn1 -> relu1 -> conv2(32, stride 2) -> bn2 -> relu2 -> pool -> torch.flatten(x, 1) -> fc``,
3×3 convolutions with padding 1 and no bias; ``pool`` is ``AdaptiveAvgPool2d(1)``, so any input size works.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import check_model_args, conv3x3, init_weights, scale_channels
from .registry import register_model

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """Two conv–BN–ReLU layers (16 and 32 channels × ``width``, the second with stride 2), GAP and ``fc``."""

    first_layer_name: str = "conv1"
    last_layer_name: str = "fc"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        check_model_args(in_channels, num_classes, width)
        c1, c2 = scale_channels(16, width), scale_channels(32, width)
        self.conv1 = conv3x3(in_channels, c1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(c1, c2, stride=2)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model
def small_cnn(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> SmallCNN:
    """The tiny test CNN; see :class:`SmallCNN`."""
    return SmallCNN(in_channels, num_classes, width)

"""A user's own CNN, written the usual way, for ``hwquant train/ptq --model tests/cli/user_net.py:Net``."""

from __future__ import annotations

from torch import nn


class Net(nn.Module):
    """Conv-BN-ReLU6 stem, a depthwise + pointwise pair, global average pool, ``view`` and a linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # depthwise
            nn.BatchNorm2d(8),
            nn.ReLU6(inplace=True),
            nn.Conv2d(8, 16, 1, bias=False),  # pointwise
            nn.BatchNorm2d(16),
            nn.ReLU6(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def make_net(num_classes: int = 10) -> nn.Module:
    """A factory that takes only some of the arguments hwquant offers (no in_channels: 3-channel input)."""
    return Net(in_channels=3, num_classes=num_classes)


def ten_classes(in_channels: int) -> nn.Module:
    """A factory with the class count fixed at 10, whatever the data holds."""
    return Net(in_channels=in_channels, num_classes=10)


def broken(in_channels: int, num_classes: int) -> nn.Module:
    raise ValueError("this factory always fails")


def not_a_model(in_channels: int, num_classes: int) -> int:
    return 42

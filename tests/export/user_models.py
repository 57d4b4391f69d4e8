"""CNNs written the way users write them (not the bundled models), for the integer-export tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Stack(nn.Module):
    """A plain stack: ``nn.Sequential`` features, ReLU6, max pool and ``x.view(x.size(0), -1)``."""

    def __init__(self, in_ch: int = 1, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Linear(16 * 3 * 3, classes)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileBlockNet(nn.Module):
    """MobileNetV2-style: stem, an inverted residual (ReLU6, depthwise, residual add), a hardswish,
    a BN without affine parameters, functional global pool and ``x.shape[0]`` reshape."""

    def __init__(self, in_ch: int = 1, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, affine=False)
        self.block = InvertedResidual(8)
        self.head = nn.Conv2d(8, 16, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.act(self.head(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.reshape(x.shape[0], -1))


class TwoBranch(nn.Module):
    """Two branches on one shared input joined by ``torch.cat``, nearest upsampling, functional pools."""

    def __init__(self, in_ch: int = 1, classes: int = 4):
        super().__init__()
        self.a = nn.Conv2d(in_ch, 6, 3, padding=1)
        self.b = nn.Conv2d(in_ch, 4, 5, padding=2)
        self.mix = nn.Conv2d(10, 12, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.sig = nn.Hardsigmoid()
        self.out = nn.Linear(12, classes)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x), inplace=True), torch.clamp(self.b(x), 0.0, 4.0)], dim=1)
        y = F.max_pool2d(self.mix(y).clamp(min=0), 2)
        y = self.sig(self.up(y))
        return self.out(y.mean((2, 3)))


USER_MODELS = {"stack": Stack, "mobile": MobileBlockNet, "two_branch": TwoBranch}

"""MobileNetV2 (Sandler et al., 2018) for small images (28×28 / 32×32).

The ImageNet network downsamples 32× (stride-2 stem and four stride-2 stages); on 28×28 Fashion-MNIST or
32×32 CIFAR images that would leave 1×1 maps after stage four.  The small-input variant used here (as in
the common CIFAR ports) keeps the stem and the second stage at stride 1, so a 32×32 input ends at 4×4
(28×28 at 4×4) and the network downsamples 8×:

=====  ======  =========  =======  ========
stage  expand  channels   blocks   stride
=====  ======  =========  =======  ========
stem   -       32         1 conv   1
1      1       16         1        1
2      6       24         2        1  (2 in the ImageNet net)
3      6       32         3        2
4      6       64         4        2
5      6       96         3        1
6      6       160        3        2
7      6       320        1        1
head   -       1280       1×1 conv, then global average pool, dropout, ``fc``
=====  ======  =========  =======  ========

Each :class:`InvertedResidual` is ``1×1 expand -> BN -> ReLU6 -> 3×3 depthwise -> BN -> ReLU6 -> 1×1
project -> BN`` (linear bottleneck, no activation after the projection), with an identity residual when
stride is 1 and the channel count is kept.  Channels are scaled by ``width`` and rounded to a multiple of
8 as in the paper (``make_divisible``); the head keeps 1280 channels for ``width <= 1``.  Everything is
written with modules and plain ``torch.flatten`` so the quantization passes see the usual structure:
conv->BN pairs visible to ``torch.fx``, ``nn.ReLU6`` modules, depthwise convs with ``groups = channels``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import init_weights
from .registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2", "make_divisible", "mobilenet_v2"]

#: (expand ratio t, output channels c, blocks n, stride s) of the small-input variant (see the module docstring)
SMALL_INPUT_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never below 0.9 ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return layers


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand (1×1), depthwise (3×3), project (1×1, linear); residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2, small-input variant (see the module docstring).

    Modules: ``features`` (stem, blocks, head conv as one ``nn.Sequential``), ``pool``
    (``AdaptiveAvgPool2d(1)``), ``dropout``, ``fc``.
    """

    first_layer_name: str = "features.0"
    last_layer_name: str = "fc"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, dropout: float = 0.2,
                 settings=SMALL_INPUT_SETTINGS) -> None:
        super().__init__()
        stem = make_divisible(32 * width)
        head = make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [*_conv_bn(in_channels, stem, 3, stride=1)]
        cin = stem
        for t, c, n, s in settings:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += _conv_bn(cin, head, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


@register_model
def mobilenet_v2(in_channels: int, num_classes: int, width: float, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 for 28×28 / 32×32 inputs (8× downsampling; see :mod:`hwquant.models.mobilenet`)."""
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes, width=width, dropout=dropout)

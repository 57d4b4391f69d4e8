"""CIFAR-style residual networks (He et al., 2016) with projection ("option B") shortcuts.

Module layout (relied on by the quantization code)::

    conv1 -> bn1 -> relu                       stem: 3×3 conv, stride 1, no max pool
    layer1 .. layerN                           nn.Sequential of BasicBlock
    pool -> torch.flatten(x, 1) -> fc          AdaptiveAvgPool2d(1), Linear

Each :class:`BasicBlock` computes ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))`` where
``shortcut`` is ``nn.Sequential(1×1 conv, BatchNorm2d)`` when the shape changes, else ``nn.Identity()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ._layers import check_model_args, conv3x3, init_weights, scale_channels
from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet18", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN pairs with a residual connection.

    Attributes ``conv1, bn1, relu1, conv2, bn2, shortcut, relu2``; every ReLU is its own non-inplace
    ``nn.ReLU`` module and the residual add happens in :meth:`forward` before ``relu2``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu2(out + self.shortcut(x))
        return out


class CifarResNet(nn.Module):
    """A ResNet for small images: 3×3 stem (stride 1, no max pool), stages of :class:`BasicBlock`, GAP, fc.

    Args:
        stage_channels: output channels of each stage before the width multiplier; the stem has
            ``stage_channels[0]`` channels.
        blocks_per_stage: number of blocks in each stage.
        strides: stride of the first block of each stage.
        in_channels: input image channels.
        num_classes: outputs of ``fc``.
        width: channel multiplier; channels become ``max(1, round(c * width))``.

    Stages are the attributes ``layer1``, ``layer2``, ...  Any input of at least 8×8 pixels works (the
    global average pool removes the spatial size).
    """

    first_layer_name: str = "conv1"
    last_layer_name: str = "fc"

    def __init__(
        self,
        stage_channels: Sequence[int],
        blocks_per_stage: Sequence[int],
        strides: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_model_args(in_channels, num_classes, width)
        if not (len(stage_channels) == len(blocks_per_stage) == len(strides)) or not stage_channels:
            raise ConfigError(
                "stage_channels, blocks_per_stage and strides must be non-empty and equally long"
            )
        channels = [scale_channels(c, width) for c in stage_channels]
        self.conv1 = conv3x3(in_channels, channels[0])
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU()
        self.num_stages = len(channels)
        c_in = channels[0]
        for i, (c_out, n_blocks, stride) in enumerate(zip(channels, blocks_per_stage, strides, strict=True)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(BasicBlock(c_in, c_out, stride if j == 0 else 1))
                c_in = c_out
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model
def resnet20(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR: stem 16, three stages of 3 blocks with 16/32/64 channels, strides 1/2/2.

    About 0.27M parameters at width 1 (3 input channels, 10 classes).
    """
    return CifarResNet((16, 32, 64), (3, 3, 3), (1, 2, 2), in_channels, num_classes, width)


@register_model
def resnet18(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """CIFAR-style ResNet-18: stem 64 (3×3, stride 1, no max pool), four stages of 2 blocks with
    64/128/256/512 channels, strides 1/2/2/2.

    About 11.17M parameters at width 1 with 10 classes, 11.22M with 100 classes.
    """
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), (1, 2, 2, 2), in_channels, num_classes, width)

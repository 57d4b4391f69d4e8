"""VGG-9 in its CIFAR form, as used in quantization papers.

``128C3-128C3-MP-256C3-256C3-MP-512C3-512C3-MP-FC1024-FC1024-FC(num_classes)``: every 3×3 conv (padding 1,
no bias) is followed by ``BatchNorm2d`` and ``ReLU``; the hidden fully connected layers are
``Linear -> ReLU`` (no batch norm), with optional dropout.

Module names, in forward order::

    conv1 bn1 relu1 conv2 bn2 relu2 pool1
    conv3 bn3 relu3 conv4 bn4 relu4 pool2
    conv5 bn5 relu5 conv6 bn6 relu6 pool3
    torch.flatten(x, 1) -> fc1 relu_fc1 [drop_fc1] -> fc2 relu_fc2 [drop_fc2] -> fc

The flatten size depends on the input size, so the model is built for one ``image_size``; each of the
three 2×2 max pools floors the spatial size (28×28 -> 3×3, 32×32 -> 4×4, 8×8 -> 1×1).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import nn

from ..errors import ConfigError
from ._layers import check_model_args, conv3x3, init_weights, scale_channels
from .registry import register_model

__all__ = ["VGG9", "vgg9"]

#: Output channels of the six convolutions (before the width multiplier).
VGG9_CONV_CHANNELS: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
#: Width of the two hidden fully connected layers (before the width multiplier).
VGG9_FC_WIDTH: int = 1024


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``; an int means a square image.  Both sides must be at least 8."""
    if isinstance(image_size, bool):
        raise ConfigError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")
    if isinstance(image_size, Integral):
        size = (int(image_size), int(image_size))
    else:
        try:
            size = tuple(image_size)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"image_size must be an int or an (H, W) pair, got {image_size!r}") from None
        if len(size) != 2 or not all(isinstance(s, Integral) and not isinstance(s, bool) for s in size):
            raise ConfigError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")
    if min(size) < 8:
        raise ConfigError(f"vgg9 needs images of at least 8×8 pixels (three 2×2 max pools), got {size}")
    return int(size[0]), int(size[1])


class VGG9(nn.Module):
    """VGG-9 for small images.

    Args:
        in_channels: input image channels.
        num_classes: outputs of ``fc``.
        width: multiplier of every conv and hidden fc width; ``c`` becomes ``max(1, round(c * width))``.
        image_size: ``(H, W)`` of the input (or one int for square images), at least 8×8; fixes the size
            of ``fc1``'s input.
        dropout: dropout probability after each hidden fc layer, in ``[0, 1)``; at 0 (default) no dropout
            modules are created.
    """

    first_layer_name: str = "conv1"
    last_layer_name: str = "fc"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        image_size: int | Sequence[int] = (32, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_model_args(in_channels, num_classes, width)
        height, wid = _image_size(image_size)
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.image_size = (height, wid)
        self.dropout = float(dropout)

        channels = [scale_channels(c, width) for c in VGG9_CONV_CHANNELS]
        c_in = in_channels
        for i, c_out in enumerate(channels, start=1):
            self.add_module(f"conv{i}", conv3x3(c_in, c_out))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c_out))
            self.add_module(f"relu{i}", nn.ReLU())
            if i % 2 == 0:
                self.add_module(f"pool{i // 2}", nn.MaxPool2d(kernel_size=2, stride=2))
            c_in = c_out

        self.feature_size = (height // 8, wid // 8)  # three floor-halvings == one floor division by 8
        hidden = scale_channels(VGG9_FC_WIDTH, width)
        self.fc1 = nn.Linear(c_in * self.feature_size[0] * self.feature_size[1], hidden)
        self.relu_fc1 = nn.ReLU()
        if dropout > 0:
            self.drop_fc1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu_fc2 = nn.ReLU()
        if dropout > 0:
            self.drop_fc2 = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(VGG9_CONV_CHANNELS) + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i % 2 == 0:
                x = getattr(self, f"pool{i // 2}")(x)
        x = torch.flatten(x, 1)
        x = self.relu_fc1(self.fc1(x))
        if self.dropout > 0:
            x = self.drop_fc1(x)
        x = self.relu_fc2(self.fc2(x))
        if self.dropout > 0:
            x = self.drop_fc2(x)
        return self.fc(x)


@register_model
def vgg9(
    in_channels: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    image_size: int | Sequence[int] = (32, 32),
    dropout: float = 0.0,
) -> VGG9:
    """VGG-9 (CIFAR form) built for inputs of ``image_size`` (default 32×32); see :class:`VGG9`."""
    return VGG9(in_channels, num_classes, width, image_size, dropout)

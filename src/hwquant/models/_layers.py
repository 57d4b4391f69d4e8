"""Helpers shared by the model definitions: argument checks, width scaling and weight initialisation."""

from __future__ import annotations

import math
from numbers import Integral, Real

from torch import nn

from ..errors import ConfigError


def check_model_args(in_channels: int, num_classes: int, width: float) -> None:
    """Raise :class:`ConfigError` unless ``in_channels >= 1``, ``num_classes >= 1`` and ``width > 0``."""
    for field, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ConfigError(f"{field} must be an integer, got {value!r}")
        if value < 1:
            raise ConfigError(f"{field} must be >= 1, got {value}")
    if isinstance(width, bool) or not isinstance(width, Real):
        raise ConfigError(f"width must be a number, got {width!r}")
    if not math.isfinite(width) or width <= 0:
        raise ConfigError(f"width must be a finite number > 0, got {width}")


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest integer (half to even), at least 1."""
    return max(1, round(channels * width))


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place from torch's global RNG.

    Convolutions: Kaiming normal (``fan_out``, ReLU gain), bias zero.  Batch norms: weight 1, bias 0.
    Linear layers: normal(0, 0.01), bias zero.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution, padding 1, no bias (a batch norm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)

"""Error metrics between a signal and its quantized version."""

from __future__ import annotations

import math

import torch


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error ``mean((x - x_hat)^2)``, accumulated in float64."""
    d = x.detach().double() - x_hat.detach().double()
    return float(d.pow(2).mean())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB (float64).

    Returns ``inf`` when ``x_hat == x`` exactly and ``-inf`` for an all-zero signal with non-zero error.
    """
    xd = x.detach().double()
    signal = float(xd.pow(2).sum())
    noise = float((xd - x_hat.detach().double()).pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)

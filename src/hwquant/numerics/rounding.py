"""Rounding modes used by every quantizer.

All functions take and return floating-point tensors holding integer values; casting to an integer dtype
is the caller's job.  Modes:

``nearest``     round half to even (IEEE 754 default, ``torch.round``)
``zero``        round toward zero (truncate, ``torch.trunc``); needs no comparator for ties in RTL
``floor``       round toward minus infinity (``torch.floor``); an arithmetic right shift in RTL
``stochastic``  ``floor(x + u)`` with ``u ~ U[0, 1)`` drawn from a ``torch.Generator``; unbiased:
                ``E[round(x)] = x``
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

ROUNDING_MODES: tuple[str, ...] = ("nearest", "zero", "floor", "stochastic")


def check_rounding(mode: str) -> str:
    """Return ``mode`` if it is a known rounding mode, else raise :class:`ConfigError`."""
    if mode not in ROUNDING_MODES:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {mode!r}")
    return mode


def uniform_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``U[0, 1)`` noise shaped like ``x``; ``generator=None`` uses torch's global (seedable) generator."""
    return torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def round_(x: torch.Tensor, mode: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``x`` **in place** with ``mode`` and return it."""
    if mode == "nearest":
        return x.round_()
    if mode == "zero":
        return x.trunc_()
    if mode == "floor":
        return x.floor_()
    if mode == "stochastic":
        return x.add_(uniform_noise(x, generator)).floor_()
    raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {mode!r}")


def round_tensor(
    x: torch.Tensor, mode: str = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Out-of-place rounding of ``x`` with ``mode`` (see the module docstring).

    >>> round_tensor(torch.tensor([-2.5, -1.5, 0.5, 1.5, 2.7]), "nearest")
    tensor([-2., -2.,  0.,  2.,  3.])
    >>> round_tensor(torch.tensor([-2.7, 2.7]), "zero")
    tensor([-2.,  2.])
    """
    return round_(x.clone(), mode, generator)

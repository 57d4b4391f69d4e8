"""The integer code grid shared by every quantizer: bit widths, code ranges, code dtypes, scale checks and the
float codes ``clamp(round(x * fl(1/s)) + z, q_min, q_max)`` (see :mod:`hwquant.numerics.uniform` for the
conventions).  No autograd, no native code: the oracle that the fused kernels are tested against.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .rounding import round_

__all__ = ["MAX_BITS", "MIN_BITS", "as_param", "check_bits", "check_scale", "code_dtype", "codes_float", "qrange",
           "shape_param"]

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: int, name: str = "bits", lo: int = MIN_BITS, hi: int = MAX_BITS) -> int:
    """Return ``bits`` if it is an int in ``[lo, hi]``, else raise :class:`ConfigError` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """Integer code range ``(q_min, q_max)`` for ``bits`` (1..32).

    >>> qrange(8), qrange(8, narrow=True), qrange(4, signed=False), qrange(5)
    ((-128, 127), (-127, 127), (0, 15), (-16, 15))
    """
    check_bits(bits, lo=1, hi=32)
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest torch integer dtype that holds every code in ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    for dt in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return dt
    return torch.int64


def as_param(p: float | torch.Tensor, x: torch.Tensor, axis: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``p`` as a tensor of ``dtype`` on ``x``'s device, shaped to broadcast along ``axis``."""
    t = torch.as_tensor(p, dtype=dtype, device=x.device)
    if axis is None:
        if t.numel() != 1:
            raise ConfigError(f"per-tensor quantization needs a scalar scale/zero point, got shape {tuple(t.shape)}")
        return t.reshape(())
    axis = axis % x.dim()
    if t.dim() != 1 or t.numel() != x.shape[axis]:
        raise ConfigError(
            f"per-channel scale/zero point must have {x.shape[axis]} entries (x.shape[{axis}]), "
            f"got shape {tuple(t.shape)}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def check_scale(scale: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless every entry of ``scale`` is finite and positive."""
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ConfigError("quantization scale must be finite and > 0")


def codes_float(
    x: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rounding: str,
    generator: torch.Generator | None,
    want_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer-valued float codes ``clamp(round(x * fl(1/s)) + z)`` and, optionally, the in-range mask.

    Works in one freshly allocated buffer (plus the mask), updating it in place.
    """
    t = x * torch.reciprocal(s)
    round_(t, rounding, generator)
    if z is not None:
        t.add_(z)
    mask = None
    if want_mask:
        mask = (t >= qmin) & (t <= qmax)
    t.clamp_(qmin, qmax)
    return t, mask


def shape_param(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A trusted scale / zero point (0-d, or 1-d along ``axis``) viewed to broadcast against ``x``."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)

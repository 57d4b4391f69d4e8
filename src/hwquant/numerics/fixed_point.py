"""Fixed point (Qm.n, two's complement): the fractional length that minimises quantization error.

A ``b``-bit fixed-point number with fractional length ``FL`` (Qm.n with ``n = FL``, ``m = b - 1 - FL``
integer bits for signed values) is an integer code times a power-of-two step::

    step   = 2^-FL
    q      = clamp(round(x * 2^FL), q_min, q_max)     q_min, q_max = -2^(b-1), 2^(b-1) - 1   (signed)
                                                                     0, 2^b - 1              (unsigned)
    x_hat  = q * 2^-FL

i.e. :func:`hwquant.numerics.fake_quantize` with ``scale = 2^-FL`` and zero point 0 (saturating, nearest
rounding by default).  ``FL`` may be negative (step > 1) or larger than ``b`` (all values below 1).

**Search.** The FL that just avoids saturating ``m = max|x|`` is ``FL_0 = b - 1 - ceil(log2 m)`` (signed;
unsigned ``b - ceil(log2 max x)``): then ``q_max * 2^-FL_0 ~ 2^ceil(log2 m) >= m``.  :func:`best_fraction_length`
evaluates the MSE ``mean((x - x_hat)^2)`` for every integer FL in ``FL_0 - radius .. FL_0 + radius`` and keeps
the smallest; on a tie it keeps the **larger FL** (the finer step, more fractional bits).

Going coarser than ``FL_0 - 1`` never helps: for ``FL <= FL_0 - 1`` nothing saturates, and the grids are nested
(every point of step ``2^-FL`` is also a point of step ``2^-(FL+1)``), so each element's nearest-rounding error
can only shrink when FL grows by one.  Going finer than ``FL_0 + radius`` clips more; it only helps for strongly
outlier-dominated tensors, where a larger ``radius`` finds it.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, DataError
from .codes import check_bits
from .rounding import check_rounding
from .uniform import fake_quantize


def fixed_point_scale(fl: int) -> float:
    """Quantization step ``2^-fl`` of fractional length ``fl`` (exact in float32/64 for ``|fl| < 126``).

    >>> fixed_point_scale(3), fixed_point_scale(-2)
    (0.125, 4.0)
    """
    if isinstance(fl, bool) or not isinstance(fl, int):
        raise ConfigError(f"fraction length must be an integer, got {fl!r}")
    return math.ldexp(1.0, -fl)


def _ceil_log2(m: float) -> int:
    """``ceil(log2 m)`` for ``m > 0``, exact (no floating-point log): ``m = f * 2^e`` with ``f in [0.5, 1)``."""
    f, e = math.frexp(m)
    return e - 1 if f == 0.5 else e


def _check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float32)
    if not x.is_floating_point():
        x = x.float()
    if x.numel() == 0:
        raise DataError("cannot choose a fraction length for an empty tensor")
    if not torch.isfinite(x).all():
        raise DataError("non-finite value (NaN or inf) in a tensor being quantized to fixed point")
    return x.detach()


def _center(m: float, bits: int, signed: bool) -> int:
    """``FL_0`` for peak value ``m`` (``max|x|`` or ``max x``); an all-zero tensor is centred as if ``m = 1``."""
    if m <= 0.0:
        return bits - 1 if signed else bits
    return (bits - 1 if signed else bits) - _ceil_log2(m)


def fl_search_range(x: torch.Tensor, bits: int, signed: bool = True, radius: int = 3) -> range:
    """Integer FLs ``FL_0 - radius .. FL_0 + radius`` around the no-saturation FL.

    ``FL_0 = bits - 1 - ceil(log2 max|x|)`` (signed) or ``bits - ceil(log2 max x)`` (unsigned, negatives
    ignored).  For an all-zero tensor (every FL is exact) ``FL_0 = bits - 1`` (signed) / ``bits`` (unsigned).

    >>> fl_search_range(torch.tensor([0.3, -1.2, 0.9]), 4, radius=1)
    range(1, 4)
    """
    check_bits(bits)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ConfigError(f"radius must be a non-negative integer, got {radius!r}")
    x = _check_x(x)
    m = float(x.abs().max()) if signed else max(float(x.max()), 0.0)
    c = _center(m, bits, signed)
    return range(c - radius, c + radius + 1)


def _fq_error(x: torch.Tensor, fl: int, bits: int, signed: bool, rounding: str) -> float:
    """MSE (float64) of the saturating fixed-point quantizer with fractional length ``fl``."""
    gen = torch.Generator().manual_seed(0) if rounding == "stochastic" else None
    x_hat = fake_quantize(x, fixed_point_scale(fl), bits, signed, rounding, generator=gen)
    return float((x.double() - x_hat.double()).pow(2).mean())


def fraction_length_errors(
    x: torch.Tensor, bits: int, fls, signed: bool = True, rounding: str = "nearest"
) -> dict[int, float]:
    """``{fl: mean((x - x_hat_fl)^2)}`` for each fractional length in ``fls`` (MSE accumulated in float64).

    ``x_hat_fl = clamp(round(x * 2^fl), q_min, q_max) * 2^-fl``; ``rounding="stochastic"`` uses a generator
    seeded with 0 so the result is reproducible.
    """
    check_bits(bits)
    check_rounding(rounding)
    x = _check_x(x)
    out: dict[int, float] = {}
    for fl in fls:
        fl = int(fl)
        out[fl] = _fq_error(x, fl, bits, signed, rounding)
    return out


def best_fraction_length(
    x: torch.Tensor, bits: int, signed: bool = True, radius: int = 3, rounding: str = "nearest"
) -> int:
    """The FL in :func:`fl_search_range` minimising ``mean((x - x_hat)^2)``; ties go to the larger FL (finer step).

    >>> best_fraction_length(torch.tensor([0.3, -1.2, 0.9]), 4)   # step 0.25: errors .05^2, .05^2, .1^2
    2
    """
    errs = fraction_length_errors(x, bits, fl_search_range(x, bits, signed, radius), signed, rounding)
    best_fl, best_e = None, math.inf
    for fl in sorted(errs, reverse=True):  # larger FL first: a later tie does not replace it
        if errs[fl] < best_e:
            best_fl, best_e = fl, errs[fl]
    return int(best_fl)


def best_fraction_length_per_channel(
    w: torch.Tensor, bits: int, axis: int = 0, signed: bool = True, radius: int = 3, rounding: str = "nearest"
) -> torch.Tensor:
    """Per-channel :func:`best_fraction_length` along ``axis``: a LongTensor of length ``w.shape[axis]``.

    Vectorised: for each offset ``k`` in ``-radius..radius`` every channel ``c`` is quantized with
    ``FL_c = FL_0,c + k`` in one per-channel :func:`fake_quantize` call; each channel keeps its own argmin
    (ties to the larger FL).  Equals calling :func:`best_fraction_length` on every channel.
    """
    check_bits(bits)
    check_rounding(rounding)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ConfigError(f"radius must be a non-negative integer, got {radius!r}")
    w = _check_x(w)
    if w.dim() == 0:
        raise ConfigError("per-channel fraction length needs a tensor with at least one dimension")
    ax = axis % w.dim()
    rows = w.movedim(ax, 0).reshape(w.shape[ax], -1)
    if rows.shape[1] == 0:
        raise DataError("cannot choose a fraction length for channels with no elements")
    peak = rows.abs().amax(dim=1) if signed else rows.amax(dim=1).clamp_min(0.0)
    centers = torch.tensor([_center(float(m), bits, signed) for m in peak], dtype=torch.long)
    best_fl = centers.clone()
    best_e = torch.full((rows.shape[0],), math.inf, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0) if rounding == "stochastic" else None
    for k in range(radius, -radius - 1, -1):  # larger FL first; strict < keeps it on ties
        fls = centers + k
        scale = torch.pow(2.0, -fls.double()).float()
        x_hat = fake_quantize(rows, scale, bits, signed, rounding, axis=0, generator=gen)
        e = (rows.double() - x_hat.double()).pow(2).mean(dim=1)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_fl = torch.where(better, fls, best_fl)
    return best_fl

"""Uniform (affine) quantization: integer codes, dequantization, and fake quantization with STE.

For a real tensor ``x``, scale ``s > 0``, zero point ``z`` and code range ``[q_min, q_max]``::

    r      = fl32(1 / s)                                  (the reciprocal, rounded once to x's dtype)
    q      = clamp(round(x * r) + z, q_min, q_max)        (integer code)
    x_hat  = (q - z) * s                                  (dequantized / fake-quantized value)

The code range for ``b`` bits is ``[-2^(b-1), 2^(b-1) - 1]`` (signed), ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
(signed, ``narrow``) or ``[0, 2^b - 1]`` (unsigned).

**Multiply by the reciprocal, never divide.**  ``x * fl32(1/s)`` and ``x / s`` differ by one ulp on a
small fraction of elements, which moves the code whenever the product sits at a rounding tie.  We use the
reciprocal everywhere because (a) it is what ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_``
compute, so our nearest-rounding output equals torch's bit for bit (tested on millions of random values),
and (b) an RTL quantizer multiplies by a reciprocal constant; nobody builds a divider for this.  For
power-of-two scales (fixed point) both forms are exact.

Per-channel quantization passes ``axis``: ``scale`` and ``zero_point`` are 1-D of length ``x.shape[axis]``.

The gradient of :func:`fake_quantize` is the clipped straight-through estimator (STE): ``dx_hat/dx = 1``
where ``q_min <= round(x * r) + z <= q_max`` and ``0`` elsewhere, exactly the mask torch's fake-quantize
uses.  If ``scale`` requires grad, it gets the LSQ gradient (Esser et al. 2020)::

    dx_hat/ds = round(x*r) - x*r        inside the range
              = q_min - z  or  q_max - z   when clipped low / high

summed over every dimension except ``axis``.

**PACT** (Choi et al. 2018, :func:`pact_fake_quantize`): a trained clip ``alpha`` and the step
``s = alpha / levels`` (``levels = q_max`` by default, so the top code is ``alpha``).  The value is
``fake_quantize(x, s)``; ``d/dx`` is the STE mask above, and ``d/dalpha`` is PACT's: the clip part of the LSQ
gradient divided by ``levels``, i.e. ``sum g * q_max / levels`` over elements clipped high (plus
``q_min / levels`` over those clipped low), nothing from elements inside the code range.  The clip boundary
is where the *code* saturates (``x >= alpha + s/2``), the same boundary the STE mask uses, rather than
PACT's ``x >= alpha`` on the unrounded value; the half-step difference keeps value, mask and gradient
consistent.

**Speed.**  Fake quantization runs fused C kernels where they apply (round to nearest, float32 on the CPU)
and registered ``torch.library`` operators under ``torch.compile``: see :mod:`hwquant.numerics.fused`.
The code grid itself (:func:`qrange`, :func:`check_bits`, ...) lives in :mod:`hwquant.numerics.codes`.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .codes import (
    MAX_BITS,
    MIN_BITS,
    as_param,
    check_bits,
    check_scale,
    code_dtype,
    codes_float,
    qrange,
    shape_param,
)
from .fused import fake_quantize_trusted, native_kernels, native_status
from .rounding import ROUNDING_MODES

__all__ = ["MAX_BITS", "MIN_BITS", "check_bits", "check_scale", "code_dtype", "dequantize", "fake_quantize",
           "fake_quantize_trusted", "native_kernels", "native_status", "pact_fake_quantize", "qrange", "quantize",
           "shape_param"]


def _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow):
    if not x.is_floating_point():
        raise ConfigError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if rounding not in ROUNDING_MODES:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}")
    qmin, qmax = qrange(bits, signed, narrow)
    s = as_param(scale, x, axis, x.dtype)
    check_scale(s)
    z = None
    if not (isinstance(zero_point, (int, float)) and zero_point == 0):
        z = as_param(zero_point, x, axis, x.dtype)
        if (z != torch.round(z)).any():
            raise ConfigError("zero point must be integer-valued")
        if (z < qmin).any() or (z > qmax).any():
            raise ConfigError(f"zero point must lie in the code range [{qmin}, {qmax}]")
    return s, z, qmin, qmax


def quantize(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    bits: int,
    signed: bool = True,
    rounding: str = "nearest",
    *,
    zero_point: int | torch.Tensor = 0,
    axis: int | None = None,
    narrow: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer codes ``clamp(round(x * fl(1/scale)) + zero_point, q_min, q_max)``.

    Returns the smallest integer dtype that holds the code range (uint8 for unsigned <= 8 bits, int8 for
    signed <= 8 bits, int16 / int32 beyond).  Shapes: ``x`` any; ``scale`` scalar or ``[x.shape[axis]]``.

    >>> quantize(torch.tensor([-1.0, -0.26, 0.25, 0.3, 9.0]), 0.5, 4)
    tensor([-2, -1,  0,  1,  7], dtype=torch.int8)
    """
    s, z, qmin, qmax = _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow)
    with torch.no_grad():
        t, _ = codes_float(x.detach(), s, z, qmin, qmax, rounding, generator, want_mask=False)
    return t.to(code_dtype(qmin, qmax))


def dequantize(
    q: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    zero_point: int | torch.Tensor = 0,
    axis: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale`` in ``dtype``."""
    ref = q.to(dtype)
    s = as_param(scale, ref, axis, dtype)
    if isinstance(zero_point, (int, float)) and zero_point == 0:
        return ref.mul_(s)
    z = as_param(zero_point, ref, axis, dtype)
    return ref.sub_(z).mul_(s)


def fake_quantize(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    bits: int,
    signed: bool = True,
    rounding: str = "nearest",
    *,
    zero_point: int | torch.Tensor = 0,
    axis: int | None = None,
    narrow: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize: ``(clamp(round(x * fl(1/scale)) + z, q_min, q_max) - z) * scale``.

    Differentiable with the clipped straight-through estimator (and the LSQ gradient for a ``scale`` that
    requires grad).  Equals ``torch.fake_quantize_per_tensor_affine`` (and ``_per_channel_affine``) bit for
    bit for ``rounding="nearest"``.

    >>> fake_quantize(torch.tensor([-1.0, 0.3, 0.74, 9.0]), 0.5, 4)
    tensor([-1.0000,  0.5000,  0.5000,  3.5000])
    """
    s, z, qmin, qmax = _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow)
    return fake_quantize_trusted(x, s, z, qmin, qmax, rounding, generator, axis)


def pact_fake_quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    bits: int,
    signed: bool = False,
    *,
    levels: int | None = None,
    narrow: bool = False,
) -> torch.Tensor:
    """PACT fake quantization with a trained clip ``alpha`` (0-d tensor, usually an ``nn.Parameter``).

    ``s = alpha / levels`` (``levels``: ``q_max`` of ``bits`` unless given, e.g. 255 for a CQAT 8-bit step
    with 4-bit codes); returns ``fake_quantize(x, s, bits, signed)`` with PACT's gradient for ``alpha`` (see
    the module docstring).  Round to nearest even.

    >>> a = torch.tensor(1.5, requires_grad=True)
    >>> y = pact_fake_quantize(torch.tensor([0.2, 0.9, 2.0]), a, 2)
    >>> y.sum().backward(); y.detach(), a.grad
    (tensor([0.0000, 1.0000, 1.5000]), tensor(1.))
    """
    qmin, qmax = qrange(check_bits(bits), signed, narrow)
    lv = qmax if levels is None else levels
    if isinstance(lv, bool) or not isinstance(lv, int) or lv < 1:
        raise ConfigError(f"levels must be a positive integer, got {levels!r}")
    a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(())
    av = float(a.detach())
    if not math.isfinite(av) or av <= 0:
        raise ConfigError(f"PACT clip alpha must be finite and > 0, got {av}")
    return fake_quantize_trusted(x, a / lv, None, qmin, qmax, "nearest", None, None, lsq=False)

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
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .rounding import ROUNDING_MODES, round_

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


def _as_param(p: float | torch.Tensor, x: torch.Tensor, axis: int | None, dtype: torch.dtype) -> torch.Tensor:
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


def _check_scale(scale: torch.Tensor) -> None:
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ConfigError("quantization scale must be finite and > 0")


def _codes_float(
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


def _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow):
    if not x.is_floating_point():
        raise ConfigError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if rounding not in ROUNDING_MODES:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}")
    qmin, qmax = qrange(bits, signed, narrow)
    s = _as_param(scale, x, axis, x.dtype)
    _check_scale(s)
    z = None
    if not (isinstance(zero_point, (int, float)) and zero_point == 0):
        z = _as_param(zero_point, x, axis, x.dtype)
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
        t, _ = _codes_float(x.detach(), s, z, qmin, qmax, rounding, generator, want_mask=False)
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
    s = _as_param(scale, ref, axis, dtype)
    if isinstance(zero_point, (int, float)) and zero_point == 0:
        return ref.mul_(s)
    z = _as_param(zero_point, ref, axis, dtype)
    return ref.sub_(z).mul_(s)


class _FakeQuantSTE(torch.autograd.Function):
    """Fused fake quantization: one pass computes the output and the STE mask; backward reuses the mask."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, rounding, generator, axis):  # noqa: D401
        scale_grad = ctx.needs_input_grad[1]
        t, mask = _codes_float(x, s, z, qmin, qmax, rounding, generator, want_mask=True)
        if z is not None:
            t.sub_(z)
        if scale_grad:
            # LSQ gradient: (q - z) - x*r inside the range, the clipped code outside.
            g_s = t - x * torch.reciprocal(s)
            g_s = torch.where(mask, g_s, t)
            ctx.save_for_backward(mask, g_s)
        else:
            ctx.save_for_backward(mask)
        ctx.axis = axis
        ctx.scale_shape = s.shape
        return t.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        mask = saved[0]
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            prod = grad * saved[1]
            if ctx.axis is None:
                grad_s = prod.sum().reshape(ctx.scale_shape)
            else:
                dims = [d for d in range(grad.dim()) if d != ctx.axis % grad.dim()]
                grad_s = prod.sum(dim=dims, keepdim=True).reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None, None


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
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
        # No gradient wanted: skip the STE mask (most of the forward cost for cache-resident tensors).
        t, _ = _codes_float(x, s, z, qmin, qmax, rounding, generator, want_mask=False)
        if z is not None:
            t.sub_(z)
        return t.mul_(s)
    return _FakeQuantSTE.apply(x, s, z, qmin, qmax, rounding, generator, axis)

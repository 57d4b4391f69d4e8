"""Bit-window quantization: a ``bits``-wide code taken out of a ``base_bits``-wide one by a right shift.

CQAT (seed ``001``) quantizes to 8 bits and then keeps only 4 (activations) / 5 (weights) bits of the code.
The hardware reading is one 8-bit quantizer followed by a shifter:

1. ``c8 = sat_base(rne(x * fl(1/d8)))``: the 8-bit quantizer with step ``d8`` (``d8 = peak / Q(base_bits)``,
   the calibrated 8-bit range), codes in ``[q_min(base), q_max(base)]``;
2. ``c = sat_bits(rne(c8 / 2^s))``: the shifter.  It drops the ``s`` low bits of the two's complement code
   rounding half to even (the adder's carry-in is bit ``s - 1`` of the code, unless the ``s - 1`` bits below
   it are zero and bit ``s`` is even: :func:`rshift_rne`, the same rounding as every requantization of
   :mod:`hwquant.export.integer`), then saturates to the ``bits``-wide range.

The stored value is ``c * 2^s * d8``: the effective step is ``2^s`` times the 8-bit step, with
``s in 0..base_bits - bits`` per layer.  The two roundings are not one rounding with the wider step: an 8-bit
code that is an odd multiple of ``2^(s-1)`` (a tie of the shifter) came from an ``x`` that may lie on either
side of the wide grid's midpoint, e.g. ``s = 1``, ``x / d8 = 1.4``: ``c8 = 1``, ``c = rne(0.5) = 0`` while
``rne(1.4 / 2) = 1``.  That is what the accelerator computes, so it is what the fake quantizer computes.
"""

from __future__ import annotations

import torch

from .codes import qrange


def rshift_rne(p: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """``round_half_even(p / 2^n)`` for int64 ``p`` and shifts ``n >= 0`` (broadcast), in integers only."""
    # (p + 2^(n-1) - 1 + lsb(floor(p / 2^n))) >> n: the remainder r rounds up when r > 2^(n-1), and at
    # r == 2^(n-1) exactly when the floor is odd (p itself for n == 0); |p| < 2^62 keeps the sum in range
    n = torch.as_tensor(n, dtype=torch.int64, device=p.device)
    half_m1 = ((torch.bitwise_left_shift(torch.ones_like(n), n) >> 1) - 1).clamp_min_(0)  # small: per channel
    odd = torch.bitwise_and(torch.bitwise_right_shift(p, n), 1)
    if bool((n == 0).any()):
        odd = odd * (n > 0).to(torch.int64)
    return torch.bitwise_right_shift(odd.add_(p).add_(half_m1), n)


def window_shifts(bits: int, base_bits: int) -> range:
    """The shifts a ``bits``-wide window of a ``base_bits``-wide code can take: ``0..base_bits - bits``."""
    return range(base_bits - bits + 1)


def window_codes_float(x: torch.Tensor, base_step: torch.Tensor, shift: int, bits: int, base_bits: int,
                       signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued float codes of both stages: ``(c8, c)`` (see the module docstring).

    ``base_step`` broadcasts against ``x`` (0-d, or shaped for a channel axis).  Exact in floating point:
    ``c8`` is an integer below ``2^base_bits`` and the division by ``2^shift`` only moves the exponent.
    """
    bmin, bmax = qrange(base_bits, signed)
    qmin, qmax = qrange(bits, signed)
    c8 = (x * torch.reciprocal(base_step)).round_().clamp_(bmin, bmax)
    c = (c8 * (2.0 ** -int(shift))).round_().clamp_(qmin, qmax)
    return c8, c


def window_codes(x: torch.Tensor, base_step: torch.Tensor, shift: int, bits: int, base_bits: int,
                 signed: bool) -> torch.Tensor:
    """The ``bits``-wide codes as int64 (the second stage of :func:`window_codes_float`)."""
    with torch.no_grad():
        return window_codes_float(x.detach(), base_step, shift, bits, base_bits, signed)[1].to(torch.int64)


class _WindowSTE(torch.autograd.Function):
    """Forward: the exact window values ``c * step``; backward: the gradient where the code is not saturated."""

    @staticmethod
    def forward(ctx, x, y, mask):  # noqa: D401
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def window_fake_quantize(x: torch.Tensor, base_step: torch.Tensor, shift: int, bits: int, base_bits: int,
                         signed: bool) -> torch.Tensor:
    """``c * 2^shift * base_step`` with the straight-through estimator: gradient 1 where the window's code is
    not saturated (``q_min <= x / (2^shift base_step) <= q_max``), 0 where it is (as the other quantizers).
    The values are exactly the codes times the step, with or without autograd."""
    step = base_step * (2.0 ** int(shift))
    with torch.no_grad():
        _, c = window_codes_float(x.detach(), base_step, shift, bits, base_bits, signed)
        y = c.mul_(step).to(x.dtype)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return y
    qmin, qmax = qrange(bits, signed)
    with torch.no_grad():
        t = x.detach() / step
        mask = ((t >= qmin) & (t <= qmax)).to(x.dtype)
    return _WindowSTE.apply(x, y, mask)


def window_mse(x: torch.Tensor, peak: torch.Tensor, bits: int, base_bits: int, signed: bool,
               axis: int | None = None) -> torch.Tensor:
    """Mean squared error of the window quantizer for every shift, float64 ``[base_bits - bits + 1]``.

    ``peak`` is ``max|x|`` (signed) or ``max x`` (unsigned), per tensor (0-d) or per channel along ``axis``;
    the 8-bit step is ``peak / Q(base_bits)`` (zero peaks get step 1: every code 0).
    """
    q8 = qrange(base_bits, signed)[1]
    d8 = torch.where(peak > 0, peak.float() / q8, torch.ones_like(peak, dtype=torch.float32))
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        d8 = d8.reshape(shape)
    out = []
    for s in window_shifts(bits, base_bits):
        _, c = window_codes_float(x.float(), d8, s, bits, base_bits, signed)
        out.append((x.double() - c.double() * (d8.double() * 2.0 ** s)).pow(2).mean())
    return torch.stack(out)

"""The operations of the integer reference model (:mod:`hwquant.export.integer`): what each computes, on
integers only, with its integer parameters (what an RTL datapath implements).

Every tensor between operations is an ``int64`` tensor ``V`` whose real value is ``V * scale`` (``scale`` per
channel along dim 1, kept as metadata in float64; the hardware never multiplies by it).  Operations:
``conv2d`` / ``linear``
    ``A = op(q_x, q_w) + B``: input codes ``q_x``, weight codes ``q_w`` (per output channel scale ``s_w``),
    bias ``B`` in accumulator units; ``scale = fl32(s_x * s_w)``.  Computed exactly (float64 on integer
    values, checked ``< 2^53``; an RTL accumulator needs ``acc_bits`` bits, reported per layer).
``requant``
    ``q = clamp(rne((V * M) >> n), q_min, q_max)`` per channel: an integer multiplier ``M`` (up to 31 bits)
    and a right shift ``n``, ``M / 2^n ~ scale_in / s_out`` (relative error below ``2^-(m-1)`` for an
    ``m``-bit ``M``; for power-of-two scales ``M`` is a power of two: a pure shift).  ``rne`` rounds the
    shifted-out bits half to even (``f = V*M >> n``, remainder ``r``: ``f + (r > h or (r == h and f odd))``,
    ``h = 2^(n-1)``).  On CPU one pass of a C kernel (:mod:`hwquant.numerics.intkernels`, self-tested
    against the torch ops, which remain the fallback).  Inserted wherever a value meets a quantized layer
    (its input quantizer's ``s_out``, code range and sign) or a :class:`~hwquant.nn.QuantAct`.
``add``
    ``V = k_a * V_a + k_b * V_b`` at the finer input scale divided by ``2^f``: ``k`` are integers (one of
    them ``2^f``, the other ``rne(ratio * 2^f)`` with at least 16 significant bits; ``f = 0`` and exact when
    the scale ratio is an integer, e.g. power-of-two scales).  A residual sum is
    kept this wide (no rounding), as the float model keeps it.
``relu``  ``max(V, 0)``.
``sumpool`` (``AvgPool2d`` / ``AdaptiveAvgPool2d(1)``) the window sum ``S`` of ``d = k^2`` values; the next
    ``requant`` divides: ``q = rne((S * M) / (d * 2^n))``, rounded exactly (an RTL divider by the constant
    ``d``, or its exact multiply-shift form).  With power-of-two scales this is the exact rounding of the
    mean, the same as the float model's correctly rounded mean.
``maxpool``  the window max (exact: scales are positive).
``flatten``  a reshape (per-channel scales repeat over the flattened spatial positions).
``concat``  ``torch.cat`` along ``dim``; along the channels each branch keeps its own per-channel scale, and
    the next ``requant`` brings every channel to the consumer's one scale (the branches requantized to a
    common scale, as a concatenating buffer stores them).  Along another dim the scales must be equal.
``upsample``  nearest-neighbour upsampling by integer factors (each value repeated).
``clamp``  ``clamp(V, lo, hi)`` with integer bounds per channel (see *Clipping* below).
``lut``  ``q_y = table[q_x - q_min]``: an elementwise activation (hardswish, hardsigmoid, SiLU, ...) as a
    ``2^b``-entry table from input codes to output codes (:class:`~hwquant.nn.layers.QuantLUTAct`).

**Clipping** (``ReLU6``, ``Hardtanh``, ``clamp`` / ``clip``, ``relu6``, ``hardtanh``): a clip ``[lo, hi]`` in
real units is carried with the value and applied where the value is next requantized, as bounds on the
output codes: ``q = clamp(requant(V), code(lo), code(hi))`` with ``code`` the consumer quantizer's own
rounding of ``fl32(lo)`` / ``fl32(hi)``.  Rounding is monotonic, so this equals quantizing the clipped float
value, whatever the scales: the requantization unit's saturation does the ReLU6.  The clip passes through
max pooling, reshapes, nearest upsampling and channel concatenation (all commute with it).  Where a clipped
value meets anything else (an add, an average pool, the output) a ``clamp`` op applies it to ``V`` with the
bounds ``ceil(lo / s)``, ``floor(hi / s)``: exact when the bounds are multiples of the scale (power-of-two
scales, ``s <= 2`` for ReLU6), otherwise within one LSB of ``V``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..nn.layers import exact_float_sums, exact_integer_op
from ..numerics.intkernels import add_native, requant_native
from ..numerics.window import rshift_rne

__all__ = ["ADD_BITS", "EXACT_F64", "MAX_M_BITS", "IntOp", "div_rne", "requant_params", "rshift_rne", "value_bits"]

EXACT_F64 = 2**53  # float64 holds every integer below this exactly
ADD_BITS = 16  # significant bits of the coarser add multiplier
MAX_M_BITS = 31  # widest requantization multiplier


# ------------------------------------------------------------------------------------------ integer helpers
def div_rne(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``round_half_even(a / b)`` for int64 ``a`` and positive int64 ``b`` (broadcast), exactly."""
    f = torch.div(a, b, rounding_mode="floor")
    r2 = 2 * (a - f * b)  # twice the remainder, in [0, 2b)
    up = (r2 > b) | ((r2 == b) & (torch.bitwise_and(f, 1) == 1))
    return f + up.to(torch.int64)


def requant_params(ratio: torch.Tensor, m_bits: int = MAX_M_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer multiplier ``M`` (``m_bits`` significant bits) and shift ``n >= 0`` with ``M / 2^n ~ ratio``.

    ``ratio`` is float64 and positive.  A power of two gives ``M = 1`` (a pure shift).  When ``ratio`` is so
    large that ``n`` would be negative, ``M`` takes the whole value and ``n = 0``.
    """
    ratio = ratio.double().reshape(-1)
    if not (torch.isfinite(ratio).all() and (ratio > 0).all()):
        raise ConfigError("requantization ratio must be finite and > 0 (a scale is zero or not finite)")
    mant, exp = torch.frexp(ratio)  # ratio = mant * 2^exp, mant in [0.5, 1)
    n = (m_bits - exp).clamp_min(0)
    m = torch.round(torch.ldexp(ratio, n)).to(torch.int64)
    # strip trailing zero bits so power-of-two ratios become pure shifts
    while True:
        even = (torch.bitwise_and(m, 1) == 0) & (n > 0) & (m > 0)
        if not bool(even.any()):
            break
        m = torch.where(even, m >> 1, m)
        n = torch.where(even, n - 1, n)
    return m, n.to(torch.int64)


def _requant_torch(p: dict[str, Any], v: torch.Tensor) -> torch.Tensor:
    """The requantization of :meth:`IntOp.run` on torch ops, before the clamp (the native kernel's oracle)."""
    m, n, d = p["multiplier"], p["shift"], p.get("divisor", 1)
    shape = (1, -1) + (1,) * (v.dim() - 2) if m.numel() > 1 else ()
    if d == 1 and p.get("float64_exact"):
        # |V * M| < 2^53 (checked at conversion): V * (M 2^-n) is exact in float64 and torch.round rounds half
        # to even, so this equals the integer shift, in fewer passes over the tensor
        return torch.mul(v, p["factor_f64"].reshape(shape)).round_().to(torch.int64)
    if d == 1:
        return rshift_rne(v * m.reshape(shape), n.reshape(shape))
    # after a sum pool: round (V * M) / (d * 2^n) exactly
    return div_rne(v * m.reshape(shape), torch.bitwise_left_shift(torch.full_like(n, d), n).reshape(shape))


def value_bits(v: float) -> int:
    """Bits of the magnitude ``v`` (``ceil(log2(v + 1))``; 0 for 0)."""
    return int(math.ceil(math.log2(v + 1))) if v > 0 else 0


# ----------------------------------------------------------------------------------------------- op records
@dataclass
class IntOp:
    """One integer operation: ``kind``, input value names, output name and integer parameters.

    ``params`` hold tensors (int64 codes / multipliers / shifts) and Python numbers; ``scale`` is the output
    value's scale (float64, 1-D per channel or 0-d), ``bound`` a guaranteed bound on ``|V|``.
    """

    kind: str
    name: str
    inputs: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    scale: torch.Tensor | None = None
    bound: float = 0.0
    shape: tuple[int, ...] = ()

    @property
    def bits(self) -> int:
        """Two's complement bits that hold every output value (sign included)."""
        return value_bits(self.bound) + 1

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        p = self.params
        k = self.kind
        if k == "requant":
            (v,) = xs
            m, n, d = p["multiplier"], p["shift"], p.get("divisor", 1)
            window = "window_shift" in p
            lo, hi = (p["base_qmin"], p["base_qmax"]) if window else (p["qmin"], p["qmax"])
            q = requant_native(v, m, n, lo, hi) if d == 1 else None  # one pass of the C kernel, clamped
            if q is None:
                q = _requant_torch(p, v).clamp_(lo, hi)
            if window:  # a bit window: the 8-bit code, then the shifter (numerics.window)
                q = rshift_rne(q, p["window_shift"]).clamp_(p["qmin"], p["qmax"])
            if "clip_lo" in p:  # a carried clip (ReLU6 ...) as per-channel code bounds
                q = torch.minimum(torch.maximum(q, _per_channel(p["clip_lo"], q)), _per_channel(p["clip_hi"], q))
            return q
        if k in ("conv2d", "linear"):
            # integer sums computed in floating point are exact while every partial sum is below 2^24
            # (float32) / 2^53 (float64); ``bound`` is the worst case over all inputs, so this is exact; beyond
            # float32, exact_integer_op splits the weights (two float32 passes) where it can
            (x,) = xs
            w = p["weight"].to(x.device)

            def fn(a, b, bias=None):
                if k == "conv2d":
                    return F.conv2d(a, b, bias, p["stride"], p["padding"], p["dilation"], p["groups"])
                return F.linear(a, b, bias)

            if self.bound < 2**24:  # the bias inside the float32 sums (bound covers it): no int64 pass for it
                bias = p.get("bias")
                with exact_float_sums(x.is_cuda):
                    acc = fn(x.float(), w.float(), None if bias is None else bias.to(x.device).float())
                return acc.to(torch.int64)
            acc = exact_integer_op(fn, x, w, float(x.abs().amax()) if x.numel() else 0.0)
            return _add_bias(acc, p.get("bias"))
        if k == "relu":
            return xs[0].clamp_min(0)
        if k == "add":
            a, b = xs
            out = add_native(a, b, p["k_a"], p["k_b"])  # one pass of the C kernel, else the torch ops
            return out if out is not None else a * _per_channel(p["k_a"], a) + b * _per_channel(p["k_b"], b)
        if k == "sumpool":
            (x,) = xs
            if p.get("global"):
                return x.sum(dim=(2, 3), keepdim=True)
            kk = p["kernel_size"]
            s = F.avg_pool2d(x.double(), kk, p["stride"], p["padding"], count_include_pad=True)
            return torch.round(s * (kk[0] * kk[1])).to(torch.int64)
        if k == "maxpool":
            (x,) = xs
            return F.max_pool2d(x.double(), p["kernel_size"], p["stride"], p["padding"], p["dilation"]).to(
                torch.int64
            )
        if k == "flatten":
            return torch.flatten(xs[0], p["start_dim"])
        if k == "identity":
            return xs[0]
        if k == "clamp":
            (x,) = xs
            return torch.minimum(torch.maximum(x, _per_channel(p["lo"], x)), _per_channel(p["hi"], x))
        if k == "concat":
            return torch.cat(xs, dim=p["dim"])
        if k == "upsample":
            sh, sw = p["factor"]
            return xs[0].repeat_interleave(sh, dim=2).repeat_interleave(sw, dim=3)
        if k == "lut":
            return p["table"][xs[0] - p["offset"]]
        raise ValueError(f"unknown integer op {k!r}")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors)."""
        d: dict[str, Any] = {"kind": self.kind, "name": self.name, "inputs": list(self.inputs),
                             "bits": self.bits, "shape": list(self.shape)}
        for key, v in self.params.items():
            if isinstance(v, torch.Tensor):
                if v.numel() <= 4:
                    d[key] = v.tolist()
            else:
                d[key] = list(v) if isinstance(v, tuple) else v
        return d


def _per_channel(k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if k.numel() == 1:
        return k.reshape(())
    return k.reshape((1, -1) + (1,) * (like.dim() - 2))


def _add_bias(acc: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = acc.to(torch.int64)  # integer-valued already (exact), so the cast is exact
    if bias is not None:
        out += bias.reshape((1, -1) + (1,) * (acc.dim() - 2))
    return out


"""The integer reference model: a quantized network run on integer codes only.

:func:`integer_model` traces a fake-quantized model (``torch.fx``, quantized layers as leaves) and turns
it into an :class:`IntegerModel`: a flat list of integer operations with integer parameters only.  Every
tensor between operations is an ``int64`` tensor ``V`` whose real value is ``V * scale`` (``scale`` per
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
    ``h = 2^(n-1)``).  Inserted wherever a value meets a quantized layer (its input quantizer's ``s_out``,
    code range and sign) or a :class:`~hwquant.nn.QuantAct`.
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

The input is quantized once, by the first layer's input quantizer (:meth:`IntegerModel.quantize_input`,
the host's job, with the quantizer's input gain ``g`` if it has one: ``rne(fl32(x * g) / s)``, see
:func:`~hwquant.nn.fold.fold_input_gain`); from there on everything is integer (a gain anywhere else is refused:
in the datapath it would be a multiplier).  The output is the last layer's accumulator;
:meth:`IntegerModel.dequantize` gives ``fl32(fl64(V) * fl64(scale))``, which equals the fake-quant model's
output bit for bit when the last layer's input codes agree (quantized layers evaluate on codes, see
:mod:`hwquant.nn.layers`).

Where the float model and the integer model can still differ: a requantization computes
``rne(fl32(y) * fl32(1/s))`` in float and ``rne(V * M >> n)`` in integers, so a value within about one
float32 ulp of a rounding tie can land on the neighbouring code; a residual ``add`` rounds in float32 and
not in integers.  :func:`compare` counts such codes layer by layer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..device import model_device
from ..errors import ConfigError
from ..nn.graph import trace as _trace
from ..nn.layers import LUT_ACTIVATIONS, QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear, QuantLUTAct, exact_float_sums
from ..nn.quantizer import FakeQuantizer
from ..numerics.uniform import qrange
from ..numerics.window import rshift_rne
from .tally import Tally, labelled_batches

__all__ = ["IntegerModel", "IntOp", "compare", "integer_model", "requant_params", "rshift_rne"]

_EXACT = 2**53  # float64 holds every integer below this exactly
_ADD_BITS = 16  # significant bits of the coarser add multiplier
_MAX_M_BITS = 31


# ------------------------------------------------------------------------------------------ integer helpers
def div_rne(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``round_half_even(a / b)`` for int64 ``a`` and positive int64 ``b`` (broadcast), exactly."""
    f = torch.div(a, b, rounding_mode="floor")
    r2 = 2 * (a - f * b)  # twice the remainder, in [0, 2b)
    up = (r2 > b) | ((r2 == b) & (torch.bitwise_and(f, 1) == 1))
    return f + up.to(torch.int64)


def requant_params(ratio: torch.Tensor, m_bits: int = _MAX_M_BITS) -> tuple[torch.Tensor, torch.Tensor]:
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


def _bitlen(v: float) -> int:
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
        return _bitlen(self.bound) + 1

    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        p = self.params
        k = self.kind
        if k == "requant":
            (v,) = xs
            m, n, d = p["multiplier"], p["shift"], p.get("divisor", 1)
            shape = (1, -1) + (1,) * (v.dim() - 2) if m.numel() > 1 else ()
            if d == 1 and p.get("float64_exact"):
                # |V * M| < 2^53 (checked at conversion): V * (M 2^-n) is exact in float64 and torch.round
                # rounds half to even, so this equals the integer shift, in fewer passes over the tensor
                q = torch.round(v.double() * p["factor_f64"].reshape(shape)).to(torch.int64)
            elif d == 1:
                q = rshift_rne(v * m.reshape(shape), n.reshape(shape))
            else:  # after a sum pool: round (V * M) / (d * 2^n) exactly
                q = div_rne(v * m.reshape(shape), torch.bitwise_left_shift(torch.full_like(n, d), n).reshape(shape))
            if "window_shift" in p:  # a bit window: the 8-bit code, then the shifter (numerics.window)
                q = rshift_rne(q.clamp_(p["base_qmin"], p["base_qmax"]), p["window_shift"])
            q.clamp_(p["qmin"], p["qmax"])
            if "clip_lo" in p:  # a carried clip (ReLU6 ...) as per-channel code bounds
                q = torch.minimum(torch.maximum(q, _per_channel(p["clip_lo"], q)), _per_channel(p["clip_hi"], q))
            return q
        if k in ("conv2d", "linear"):
            # integer sums computed in floating point are exact while every partial sum is below 2^24
            # (float32) / 2^53 (float64); ``bound`` is the worst case over all inputs, so this is exact
            (x,) = xs
            dt = torch.float32 if self.bound < 2**24 else torch.float64
            w = p["weight"].to(x.device, dt)
            with exact_float_sums(x.is_cuda):
                if k == "conv2d":
                    acc = F.conv2d(x.to(dt), w, None, p["stride"], p["padding"], p["dilation"], p["groups"])
                else:
                    acc = F.linear(x.to(dt), w)
            return _add_bias(acc, p.get("bias"))
        if k == "relu":
            return xs[0].clamp_min(0)
        if k == "add":
            a, b = xs
            return a * _per_channel(p["k_a"], a) + b * _per_channel(p["k_b"], b)
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


# ----------------------------------------------------------------------------------------------- the model
class IntegerModel(nn.Module):
    """A quantized network as a list of :class:`IntOp` on int64 tensors (see the module docstring).

    ``model(codes)`` runs from input codes to the output accumulator; :meth:`run` starts from a float
    input.  :meth:`trace` returns every intermediate value (for golden vectors).  ``.to(device)`` moves every
    op's tensors and ``state_dict`` holds them (the extra state); dtype conversions are refused.
    """

    def __init__(self, ops: list[IntOp], input_quant: FakeQuantizer, input_name: str, output_name: str,
                 input_shape: tuple[int, ...]):
        super().__init__()
        self.ops = ops
        self.input_quant = input_quant
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(input_shape)
        qmin, qmax = qrange(input_quant.spec.bits, bool(input_quant.signed), input_quant.spec.narrow)
        self.input_range = (qmin, qmax)
        self.input_scale = input_quant.scale.detach().double().reshape(())
        self._by_name = {op.name: op for op in ops}

    @property
    def input_gain(self) -> float:
        """The host's float32 factor on the float input before its quantization (1: none)."""
        return float(self.input_quant.input_gain)

    @property
    def output_scale(self) -> torch.Tensor:
        return self._by_name[self.output_name].scale

    # The ops' tensors live in their ``params`` dicts (an op list, not submodules), so the two nn.Module hooks
    # that visit buffers are implemented here: ``_apply`` (``.to(device)``, ``.cuda()``, ``.cpu()``) and the
    # extra state of ``state_dict`` / ``load_state_dict``.
    def _op_tensors(self):
        """``(holder, key, tensor)`` for every tensor the ops hold."""
        for op in self.ops:
            for k, v in op.params.items():
                if isinstance(v, torch.Tensor):
                    yield op.params, k, v
        yield self.__dict__, "input_scale", self.input_scale

    def _apply(self, fn, recurse: bool = True):
        """Moves every op tensor with the model; conversions that would change a dtype (``.half()``,
        ``.float()``: the integer codes and the float64 scales are exact by construction) are refused before
        anything changes."""
        probe = [torch.zeros((), dtype=d, device=self.input_scale.device) for d in (torch.int64, torch.float64)]
        if any(fn(t).dtype != t.dtype for t in probe):
            raise ConfigError("an integer model keeps its dtypes (int64 codes, float64 scales): only its device "
                              "can change")
        super()._apply(fn, recurse)
        for holder, k, v in list(self._op_tensors()):
            holder[k] = fn(v)
        for op in self.ops:
            if op.scale is not None:
                op.scale = fn(op.scale)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"ops": {op.name: {"kind": op.kind, "params": dict(op.params), "scale": op.scale,
                                  "bound": op.bound} for op in self.ops},
                "input_scale": self.input_scale}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        ops = state["ops"]
        mine = {op.name: op.kind for op in self.ops}
        if {n: o["kind"] for n, o in ops.items()} != mine:
            raise ConfigError("integer model state of another network: its ops differ from this model's")
        for op in self.ops:  # check everything before changing anything
            saved = ops[op.name]["params"]
            for k, v in op.params.items():
                w = saved.get(k)
                if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor) or (
                        isinstance(v, torch.Tensor) and (v.shape != w.shape or v.dtype != w.dtype)):
                    raise ConfigError(f"integer model state: {op.name}.{k} differs in kind, shape or dtype")
        for op in self.ops:
            saved = ops[op.name]
            op.params = {k: v.to(op.params[k].device) if isinstance(v, torch.Tensor) else v
                         for k, v in saved["params"].items()}
            op.scale = None if saved["scale"] is None else saved["scale"].to(self.input_scale.device)
            op.bound = saved["bound"]
        self.input_scale = state["input_scale"].to(self.input_scale.device)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input codes (int64) with the first layer's input quantizer (its input gain included)."""
        if x.dim() != len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise ConfigError(f"input shape {tuple(x.shape)} does not match the exported {self.input_shape}")
        if not torch.isfinite(x).all():
            raise ConfigError("input holds NaN or infinite values")
        return self.input_quant.codes(x.float()).to(torch.int64)

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.dtype.is_floating_point or codes.dim() != len(self.input_shape):
            raise ConfigError(f"input codes must be an integer tensor of rank {len(self.input_shape)}")
        lo, hi = self.input_range
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ConfigError(f"input codes outside [{lo}, {hi}]")

    def trace(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value, by name, for input ``codes``."""
        self.check_codes(codes)
        env = {self.input_name: codes.to(torch.int64)}
        for op in self.ops:
            env[op.name] = op.run(*(env[i] for i in op.inputs))
        return env

    @torch.no_grad()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.trace(codes)[self.output_name]

    def dequantize(self, v: torch.Tensor) -> torch.Tensor:
        """``fl32(fl64(V) * fl64(scale))`` (per channel along dim 1)."""
        s = self.output_scale
        s = s.reshape((1, -1) + (1,) * (v.dim() - 2)) if s.numel() > 1 else s.reshape(())
        return (v.double() * s).float()

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> dequantized float output (what the fake-quant model returns)."""
        return self.dequantize(self(self.quantize_input(x)))

    def layers(self) -> list[dict[str, Any]]:
        """Per conv/linear layer: name, accumulator bits (worst case), weight/input bits, MACs."""
        rows = []
        for op in self.ops:
            if op.kind in ("conv2d", "linear"):
                rows.append({"layer": op.name, "kind": op.kind, "acc_bits": op.bits, "acc_bound": op.bound,
                             "w_bits": op.params["w_bits"], "x_bits": op.params["x_bits"],
                             "macs": op.params["macs"]})
        return rows

    def summary(self) -> list[dict[str, Any]]:
        return [op.describe() for op in self.ops]


# ---------------------------------------------------------------------------------------------- conversion
_LEAVES = (*QUANT_LAYERS, QuantAct, FakeQuantizer, QuantLUTAct)
_NO_CLIP = 2.0**62  # "no bound" in integer clamp bounds


@dataclass
class _Val:
    """Conversion-time metadata of one integer value."""

    name: str
    scale: torch.Tensor  # float64, 1-D per channel (dim 1) or 0-d
    bound: float
    example: torch.Tensor  # int64 example value (shapes)
    codes: tuple | None = None  # (s_out float32 0-d, qmin, qmax) when these are stored codes
    divisor: int = 1  # a sum pool's window size: the real value is V * scale / divisor
    clip: tuple[torch.Tensor, torch.Tensor] | None = None  # carried clip (lo, hi), real units, 0-d or per channel

    def with_clip(self, lo: float, hi: float) -> _Val:
        """This value clipped to ``[lo, hi]`` (intersected with a clip it already carries)."""
        lo_t, hi_t = torch.tensor(float(lo), dtype=torch.float64), torch.tensor(float(hi), dtype=torch.float64)
        if self.clip is not None:
            lo_t, hi_t = torch.maximum(self.clip[0], lo_t), torch.minimum(self.clip[1], hi_t)
        return _Val(self.name, self.scale, self.bound, self.example, self.codes, self.divisor, (lo_t, hi_t))


class _Shape(tuple):
    """A traced ``x.shape`` / ``x.size()``: the example's sizes (reshape arguments resolve against them)."""


def _scale_vec(s: torch.Tensor, channels: int) -> torch.Tensor:
    s = s.double().reshape(-1)
    return s.expand(channels).clone() if s.numel() == 1 else s


class _Builder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.mods = dict(model.named_modules())
        self.ops: list[IntOp] = []
        self.vals: dict[str, _Val] = {}
        self.count: dict[str, int] = {}
        self.input_name: str | None = None  # the model input's value (the only one a gained quantizer may read)

    def _fresh(self, base: str) -> str:
        n = self.count.get(base, 0)
        self.count[base] = n + 1
        return base if n == 0 else f"{base}.{n}"

    def emit(self, op: IntOp, example: torch.Tensor, codes=None, divisor: int = 1) -> _Val:
        op.shape = tuple(example.shape)
        self.ops.append(op)
        v = _Val(op.name, op.scale, op.bound, example, codes, divisor)
        self.vals[op.name] = v
        return v

    def requant(self, v: _Val, q: FakeQuantizer, where: str) -> _Val:
        """``v`` as codes of quantizer ``q`` (a no-op if it already is)."""
        if not (q.enabled and q.calibrated):
            raise ConfigError(f"{where}: its input quantizer is not calibrated/enabled; nothing to export")
        if not q.spec.symmetric or q.axis is not None:
            raise ConfigError(f"{where}: integer export needs per-tensor activation quantizers with zero point 0")
        if q.spec.rounding != "nearest":
            raise ConfigError(f"{where}: integer export supports rounding='nearest' activations only")
        if q.input_gain != 1.0 and v.name != self.input_name:
            raise ConfigError(f"{where}: its input quantizer has an input gain ({q.input_gain:.9g}), which only a "
                              "quantizer of the model input can have (the host scales the image; inside the "
                              "datapath it would be a multiplier)")
        s_out = q.scale.detach().float().reshape(())
        qmin, qmax = qrange(q.spec.bits, bool(q.signed), q.spec.narrow)
        if v.clip is None and v.codes is not None and torch.equal(v.codes[0], s_out) and v.codes[1:] == (qmin, qmax):
            return v
        c = v.example.shape[1] if v.example.dim() > 1 else 1
        # a bit window requantizes to its step_bits-wide codes (step d8) and shifts them (numerics.window)
        s_req = q.base_step().detach().float().reshape(()) if q.windowed else s_out
        ratio = _scale_vec(v.scale, c) / s_req.double()
        m_bits = min(_MAX_M_BITS, 62 - _bitlen(v.bound))
        max_shift = 62 - _bitlen(v.divisor)
        m, n = requant_params(ratio, m_bits)
        if int(n.max()) > max_shift:  # a tiny ratio: fewer multiplier bits keep the shift in range
            m_bits -= int(n.max()) - max_shift
            m, n = requant_params(ratio, max(m_bits, 1))
        if m_bits < 12:
            raise ConfigError(f"{where}: value of {_bitlen(v.bound)} bits leaves no room for a requant multiplier")
        if m.numel() > 1 and bool((m == m[0]).all() and (n == n[0]).all()):
            m, n = m[:1], n[:1]
        params = {"multiplier": m, "shift": n, "divisor": v.divisor, "qmin": qmin, "qmax": qmax,
                  "out_scale": float(s_out), "bits": q.spec.bits, "signed": bool(q.signed)}
        if q.windowed:
            params["base_qmin"], params["base_qmax"] = qrange(q.spec.q_step_bits, bool(q.signed))
            params["base_scale"] = float(s_req)
            params["base_bits"] = q.spec.q_step_bits
            params["window_shift"] = int(q.window_shift)
        if v.divisor == 1 and v.bound * float(m.max()) < _EXACT:  # a faster exact evaluation (see IntOp.run)
            params["float64_exact"] = True
            params["factor_f64"] = torch.ldexp(m.double(), -n)
        codes = (s_out, qmin, qmax)
        if v.clip is not None:
            # the consumer's own rounding of fl32(lo) / fl32(hi): round is monotonic, so clamping the codes
            # equals quantizing the clipped float value
            big = torch.finfo(torch.float32).max
            lo, hi = (q.codes(b.float().clamp(-big, big).reshape(-1)).to(torch.int64) for b in v.clip)
            params["clip_lo"], params["clip_hi"] = lo, hi
        op = IntOp("requant", self._fresh(f"{where}.requant"), (v.name,), params,
                   scale=s_out.double(), bound=float(max(-qmin, qmax)))
        return self.emit(op, op.run(v.example), codes=codes)

    def materialize(self, v: _Val, where: str) -> _Val:
        """Apply a carried clip to ``V`` itself (a ``clamp`` op; see the module docstring)."""
        if v.clip is None:
            return v
        if v.divisor != 1:
            raise ConfigError(f"{where}: an average pool's output must go (through flatten) to a quantized layer")
        c = v.example.shape[1] if v.example.dim() > 1 else 1
        s = _scale_vec(v.scale, c)
        lo = torch.ceil(v.clip[0] / s).clamp(-_NO_CLIP, _NO_CLIP).to(torch.int64)
        hi = torch.floor(v.clip[1] / s).clamp(-_NO_CLIP, _NO_CLIP).to(torch.int64)
        if lo.numel() > 1 and bool((lo == lo[0]).all() and (hi == hi[0]).all()):
            lo, hi = lo[:1], hi[:1]
        bound = min(v.bound, float(torch.maximum(lo.abs(), hi.abs()).max()))
        op = IntOp("clamp", self._fresh(f"{where}.clamp"), (v.name,), {"lo": lo, "hi": hi}, scale=v.scale,
                   bound=bound)
        return self.emit(op, op.run(v.example))

    def concat(self, name: str, vals: list[_Val], dim: int) -> _Val:
        ex = vals[0].example
        dim = dim % ex.dim()
        if any(v.divisor != 1 for v in vals):
            raise ConfigError(f"{name}: an average pool's output must go (through flatten) to a quantized layer")
        chans = [v.example.shape[1] if v.example.dim() > 1 else 1 for v in vals]
        vecs = [_scale_vec(v.scale, c) for v, c in zip(vals, chans, strict=True)]
        clip = None
        if dim == 1:
            scale = torch.cat(vecs)
            if bool((scale == scale[0]).all()):
                scale = scale[0].clone()
            if any(v.clip is not None for v in vals):
                inf = torch.tensor(math.inf, dtype=torch.float64)
                lo = torch.cat([(v.clip[0] if v.clip else -inf).expand(c) for v, c in zip(vals, chans, strict=True)])
                hi = torch.cat([(v.clip[1] if v.clip else inf).expand(c) for v, c in zip(vals, chans, strict=True)])
                clip = (lo, hi)
        else:
            if not all(torch.equal(vecs[0], w) for w in vecs[1:]):
                raise ConfigError(f"{name}: concatenation along dim {dim} needs equal scales on every input "
                                  "(quantize the inputs with one QuantAct first)")
            vals = [self.materialize(v, name) for v in vals]
            scale = vals[0].scale
        codes = vals[0].codes if all(v.codes is not None and v.codes[1:] == vals[0].codes[1:]
                                     and torch.equal(v.codes[0], vals[0].codes[0]) for v in vals) else None
        op = IntOp("concat", self._fresh(name), tuple(v.name for v in vals), {"dim": dim}, scale=scale,
                   bound=max(v.bound for v in vals))
        out = self.emit(op, op.run(*(v.example for v in vals)), codes=codes if clip is None else None)
        out.clip = clip
        return out

    def lut(self, name: str, m: QuantLUTAct, v: _Val) -> _Val:
        xq = self.requant(v, m.input_quant, name)
        oq = m.output_quant
        if not (oq.spec.symmetric and oq.axis is None):
            raise ConfigError(f"{name}: integer export needs a per-tensor output quantizer with zero point 0")
        table, offset = m.table()
        s_out = oq.scale.detach().float().reshape(())
        qmin, qmax = qrange(oq.spec.bits, bool(oq.signed), oq.spec.narrow)
        op = IntOp("lut", self._fresh(f"{name}.lut"), (xq.name,),
                   {"table": table, "offset": offset, "function": type(m.act).__name__, "qmin": qmin, "qmax": qmax,
                    "in_scale": float(m.input_quant.scale), "out_scale": float(s_out)},
                   scale=s_out.double(), bound=float(table.abs().max()))
        return self.emit(op, op.run(xq.example), codes=(s_out, qmin, qmax))

    def layer(self, name: str, m: QuantConv2d | QuantLinear, v: _Val) -> _Val:
        s_acc = m.accumulator_scale()
        if s_acc is None:
            raise ConfigError(f"{name}: {m.no_integer_form()}: no integer form")
        if m.weight_quant.spec.rounding != "nearest":
            raise ConfigError(f"{name}: integer export supports rounding='nearest' weights only")
        xq = self.requant(v, m.input_quant, name)
        with torch.no_grad():
            w_hat = m.weight_quant(m.weight.detach())
            s_w = m.weight_quant.scale.detach().float()
            sw = s_w.reshape((-1,) + (1,) * (w_hat.dim() - 1)) if s_w.numel() > 1 else s_w.reshape(())
            qw = torch.round(w_hat / sw).to(torch.int64)
            try:
                qb = m.bias_codes(s_acc)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        qb = None if qb is None else qb.to(torch.int64)
        k = m.weight[0].numel()
        per_out = qw.reshape(qw.shape[0], -1).abs().sum(dim=1).double() * xq.bound
        if qb is not None:
            per_out = per_out + qb.abs().double()
        bound = float(per_out.max())
        if bound >= _EXACT:
            raise ConfigError(f"{name}: accumulator bound 2^{math.log2(bound):.1f} exceeds the exact float64 range")
        w_bits = getattr(m.weight_quant, "code_bits", m.weight_quant.spec.bits)  # MPQ: w_bits + 1 on its grid
        params: dict[str, Any] = {"weight": qw, "bias": qb, "w_bits": w_bits,
                                  "x_bits": m.input_quant.spec.bits, "w_scale": s_w.double().reshape(-1),
                                  "x_scale": float(xq.codes[0]), "in_codes": (xq.codes[1], xq.codes[2])}
        if isinstance(m, QuantConv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ConfigError(f"{name}: integer export supports numeric zero padding only")
            params.update(stride=tuple(m.stride), padding=tuple(m.padding), dilation=tuple(m.dilation),
                          groups=m.groups)
            kind = "conv2d"
        else:
            kind = "linear"
        op = IntOp(kind, self._fresh(name), (xq.name,), params, scale=s_acc.double(), bound=bound)
        out = op.run(xq.example)
        params["macs"] = int(out[0].numel() * k)
        return self.emit(op, out)

    def add(self, name: str, a: _Val, b: _Val) -> _Val:
        if a.divisor != 1 or b.divisor != 1:
            raise ConfigError(f"{name}: an average pool's output must go (through flatten) to a quantized layer")
        a, b = self.materialize(a, name), self.materialize(b, name)
        c = a.example.shape[1] if a.example.dim() > 1 else 1
        sa, sb = _scale_vec(a.scale, c), _scale_vec(b.scale, c)
        fine, coarse = torch.minimum(sa, sb), torch.maximum(sa, sb)
        r = coarse / fine
        if bool((r == torch.round(r)).all()):
            f = 0  # integer ratios (power-of-two scales): exact with no extra fraction bits
        else:
            f = max(0, _ADD_BITS - 1 - math.floor(math.log2(float(r.min()))))
        s_out = fine / 2.0**f
        ka = torch.round(sa / s_out).to(torch.int64)
        kb = torch.round(sb / s_out).to(torch.int64)
        bound = float((ka.double() * a.bound + kb.double() * b.bound).max())
        if bound >= 2**62:
            raise ConfigError(f"{name}: residual sum needs more than 62 bits")
        op = IntOp("add", self._fresh(name), (a.name, b.name), {"k_a": ka, "k_b": kb, "frac_bits": f},
                   scale=s_out, bound=bound)
        return self.emit(op, op.run(a.example, b.example))

    def unary(self, kind: str, name: str, v: _Val, params=None, scale=None, bound=None, keep_codes=False,
              divisor: int | None = None, clip=None) -> _Val:
        """One-input op.  Ops that commute with a clip (max pool, reshapes, upsampling) pass ``clip`` on;
        for every other op a carried clip is applied first."""
        if v.divisor != 1 and kind not in ("flatten",):
            raise ConfigError(f"{name}: an average pool's output must go (through flatten) to a quantized layer")
        if clip is None:
            v = self.materialize(v, name)
        op = IntOp(kind, self._fresh(name), (v.name,), params or {}, scale=v.scale if scale is None else scale,
                   bound=v.bound if bound is None else bound)
        d = v.divisor if divisor is None else divisor
        out = self.emit(op, op.run(v.example), codes=v.codes if keep_codes else None, divisor=d)
        out.clip = clip if clip is not None and v.clip is not None else None
        return out


def integer_model(qmodel: nn.Module, example_input: torch.Tensor) -> IntegerModel:
    """Build the :class:`IntegerModel` of a fake-quantized model (BatchNorm folded, every conv/linear
    quantized with calibrated per-tensor input and per-tensor/per-channel weight quantizers).

    ``example_input``: one float batch of the model's input shape (used for shapes only).  The model is
    not modified (its train/eval mode is restored).

    Supported graph nodes: the quantized layers, :class:`~hwquant.nn.QuantAct` and
    :class:`~hwquant.nn.layers.QuantLUTAct`; ``ReLU`` / ``ReLU6`` / ``Hardtanh`` / ``clamp`` / ``clip``
    (modules, functions, methods, in place or not); residual ``add``; ``torch.cat``; max / average /
    adaptive-average(1) pooling and ``mean`` over the spatial dims (modules and functions); ``flatten`` /
    ``view`` / ``reshape`` to ``(N, -1)`` (``x.size(0)`` and ``x.shape[0]`` included); nearest upsampling by
    integer factors; ``Identity`` / ``Dropout``.  The float input may feed several layers when their input
    quantizers agree.

    Raises:
        ConfigError: an operation has no integer form here (an unfolded BatchNorm, a float conv, an
            asymmetric or stochastic quantizer, an unknown function); the message names the node and the op.
    """
    was_training = qmodel.training
    qmodel.eval()
    try:
        return _convert(qmodel, example_input)
    finally:
        qmodel.train(was_training)


def _convert(qmodel: nn.Module, example_input: torch.Tensor) -> IntegerModel:
    graph = _trace(qmodel, leaves=_LEAVES, what="integer export")
    b = _Builder(qmodel)
    env: dict[str, Any] = {}
    st: dict[str, Any] = {"input_quant": None, "input_name": None, "input_val": None, "input_layer": None}
    output_name = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if st["input_name"] is not None:
                raise ConfigError(f"{node.name}: integer export supports models with one input")
            st["input_name"] = b.input_name = node.name
            env[node.name] = ("input", node)
            continue
        if node.op == "get_attr":
            raise ConfigError(f"{node.name}: a tensor attribute ({node.target}) used in forward has no integer form "
                              "here; make it a module")
        args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "output":
            out = args[0]
            if isinstance(out, _Val):
                out = b.materialize(out, "output")
            if not isinstance(out, _Val) or out.divisor != 1:
                raise ConfigError("the model output must be a layer's accumulator (an integer value)")
            output_name = out.name
            continue
        if node.op == "call_module":
            env[node.name] = _module_node(b, st, node, b.mods[node.target], args, example_input)
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _function_node(b, st, node, args, kwargs, example_input)
        else:
            raise ConfigError(f"{node.name}: unsupported graph node {node.op}")
    if st["input_quant"] is None or output_name is None:
        raise ConfigError("the model has no quantized first layer or no output")
    return IntegerModel(b.ops, st["input_quant"], st["input_name"], output_name, tuple(example_input.shape))


def _val(a: Any, node: torch.fx.Node) -> _Val:
    if isinstance(a, tuple) and a and a[0] == "input":
        raise ConfigError(f"{node.name}: the float input must first meet a quantized layer "
                          f"({node.op} {_op_name(node)})")
    if not isinstance(a, _Val):
        raise ConfigError(f"{node.name}: unsupported argument {a!r} of {_op_name(node)}")
    return a


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _input_val(b: _Builder, st: dict[str, Any], q: FakeQuantizer | None, name: str, example: torch.Tensor) -> _Val:
    """The model input as codes of ``q``, the input quantizer of layer ``name`` (shared by every layer that
    reads the input, which must then quantize it alike)."""
    if q is None or not (q.enabled and q.calibrated):
        raise ConfigError(f"{name}: the first layer's input is not quantized")
    if not q.spec.symmetric or q.axis is not None or q.spec.rounding != "nearest":
        raise ConfigError(f"{name}: the input quantizer must be per tensor, zero point 0, rounding='nearest'")
    if q.windowed:
        raise ConfigError(f"{name}: the model input's quantizer is a bit window; export quantizes the input in one "
                          "stage (quantize the first layer's input with a plain step, e.g. first_last_bits)")
    qmin, qmax = qrange(q.spec.bits, bool(q.signed), q.spec.narrow)
    s_in = q.scale.detach().float().reshape(())
    if st["input_val"] is not None:
        a = st["input_val"]
        g0 = st["input_quant"].input_gain
        if not (torch.equal(a.codes[0], s_in) and a.codes[1:] == (qmin, qmax) and q.input_gain == g0):
            raise ConfigError(f"{name} and {st['input_layer']} both read the model input but quantize it differently "
                              f"(scale {float(s_in):g} [{qmin}, {qmax}] gain {q.input_gain:.9g} vs "
                              f"{float(a.codes[0]):g} [{a.codes[1]}, {a.codes[2]}] gain {g0:.9g}); the hardware "
                              "quantizes its input once")
        return a
    codes = q.codes(torch.zeros(example.shape)).to(torch.int64)
    a = _Val(st["input_name"], s_in.double(), float(max(-qmin, qmax)), codes, (s_in, qmin, qmax))
    b.vals[st["input_name"]] = a
    st.update(input_quant=q, input_val=a, input_layer=name)
    return a


def _is_input(a: Any) -> bool:
    return isinstance(a, tuple) and not isinstance(a, _Shape) and len(a) == 2 and a[0] == "input"


def _module_node(b: _Builder, st: dict[str, Any], node: torch.fx.Node, m: nn.Module, args, example) -> Any:
    name = str(node.target)
    if isinstance(m, QUANT_LAYERS):
        a = _input_val(b, st, m.input_quant, name, example) if _is_input(args[0]) else _val(args[0], node)
        return b.layer(name, m, a)
    if isinstance(m, QuantLUTAct):
        a = _input_val(b, st, m.input_quant, name, example) if _is_input(args[0]) else _val(args[0], node)
        return b.lut(name, m, a)
    if isinstance(m, QuantAct):
        return b.requant(_val(args[0], node), m.quant, name)
    if isinstance(m, nn.ReLU):
        return _relu(b, name, _val(args[0], node))
    if isinstance(m, nn.Hardtanh):  # ReLU6 included
        return _val(args[0], node).with_clip(m.min_val, m.max_val)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return _val(args[0], node)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise ConfigError(f"{name}: only AdaptiveAvgPool2d(1) has an integer form here")
        return _global_pool(b, name, _val(args[0], node))
    if isinstance(m, nn.AvgPool2d):
        return _avg_pool(b, name, _val(args[0], node), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                         m.count_include_pad, m.divisor_override)
    if isinstance(m, nn.MaxPool2d):
        return _max_pool(b, name, _val(args[0], node), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                         m.return_indices)
    if isinstance(m, nn.Flatten):
        return _reshape_flat(b, name, _val(args[0], node), m.start_dim, m.end_dim)
    if isinstance(m, nn.Upsample):
        return _upsample(b, name, _val(args[0], node), m.size, m.scale_factor, m.mode)
    if isinstance(m, nn.BatchNorm2d):
        raise ConfigError(f"{name}: BatchNorm must be folded before integer export (fold_batchnorm; a BN that does "
                          "not follow a conv cannot be folded)")
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        raise ConfigError(f"{name}: layer is not quantized; integer export needs every conv/linear quantized")
    if isinstance(m, LUT_ACTIVATIONS):
        raise ConfigError(f"{name}: {type(m).__name__} is not quantized (quantize_model turns it into a QuantLUTAct "
                          "when the recipe gives it an activation spec)")
    raise ConfigError(f"{name}: module {type(m).__name__} has no integer form here")


_ADD = (operator.add, torch.add, "add", operator.iadd, "add_")
_RELU = (F.relu, torch.relu, "relu", torch.relu_, "relu_")
_CLAMP = (torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_", F.hardtanh, F.relu6, "clamp_min", "clamp_max")
_FLAT = (torch.flatten, "flatten", "view", "reshape", torch.reshape)
_PASS = ("contiguous", F.dropout, F.dropout2d)


def _arg(args, kwargs, i: int, key: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _function_node(b: _Builder, st: dict[str, Any], node: torch.fx.Node, args, kwargs, example) -> Any:
    t = node.target
    name = node.name
    # shape queries: x.size(), x.size(0), x.shape, x.shape[0], len(...)
    if t == "size" or (t is getattr and len(args) > 1 and args[1] == "shape"):
        src = args[0]
        shape = _Shape(example.shape if _is_input(src) else _val(src, node).example.shape)
        dim = args[1] if t == "size" and len(args) > 1 else kwargs.get("dim")
        return shape[dim] if isinstance(dim, int) else shape
    if t is operator.getitem and isinstance(args[0], _Shape):
        return args[0][args[1]]
    if t in _ADD:
        if len(args) != 2 or not all(isinstance(a, _Val) for a in args) or set(kwargs) - {"alpha"} or \
                kwargs.get("alpha", 1) != 1:
            raise ConfigError(f"{name}: only the sum of two tensors is supported ({_op_name(node)})")
        return b.add(name, _val(args[0], node), _val(args[1], node))
    if t in _RELU:
        return _relu(b, name, _val(args[0], node))
    if t in _CLAMP:
        v = _val(args[0], node)
        if t is F.relu6:
            lo, hi = 0.0, 6.0
        elif t is F.hardtanh:
            lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        elif t == "clamp_min":
            lo, hi = _arg(args, kwargs, 1, "min"), None
        elif t == "clamp_max":
            lo, hi = None, _arg(args, kwargs, 1, "max")
        else:
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
        for bound in (lo, hi):
            if bound is not None and not isinstance(bound, (int, float)):
                raise ConfigError(f"{name}: {_op_name(node)} needs constant number bounds for an integer form")
        return v.with_clip(-math.inf if lo is None else lo, math.inf if hi is None else hi)
    if t in _FLAT:
        v = _val(args[0], node)
        if t in (torch.flatten, "flatten"):
            return _reshape_flat(b, name, v, _arg(args, kwargs, 1, "start_dim", 0),
                                 _arg(args, kwargs, 2, "end_dim", -1))
        shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size"),)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"{name}: {_op_name(node)} with a shape of {shape!r} has no integer form here")
        target = v.example.reshape(*shape).shape
        if target == v.example.shape:
            return v
        if len(target) == 2 and target[0] == v.example.shape[0]:
            return _reshape_flat(b, name, v, 1, -1)
        raise ConfigError(f"{name}: {_op_name(node)} to {tuple(shape)} has no integer form here (only (N, -1))")
    if t in _PASS:
        return _val(args[0], node)
    if t in (torch.cat, torch.concat, torch.concatenate):
        vals = [_val(a, node) for a in _arg(args, kwargs, 0, "tensors")]
        return b.concat(name, vals, _arg(args, kwargs, 1, "dim", 0))
    if t is F.max_pool2d:
        ks = _arg(args, kwargs, 1, "kernel_size")
        return _max_pool(b, name, _val(args[0], node), ks, _arg(args, kwargs, 2, "stride") or ks,
                         _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                         _arg(args, kwargs, 5, "ceil_mode", False), _arg(args, kwargs, 6, "return_indices", False))
    if t is F.avg_pool2d:
        ks = _arg(args, kwargs, 1, "kernel_size")
        return _avg_pool(b, name, _val(args[0], node), ks, _arg(args, kwargs, 2, "stride") or ks,
                         _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "ceil_mode", False),
                         _arg(args, kwargs, 5, "count_include_pad", True), _arg(args, kwargs, 6, "divisor_override"))
    if t is F.adaptive_avg_pool2d:
        if _pair(_arg(args, kwargs, 1, "output_size")) != (1, 1):
            raise ConfigError(f"{name}: only adaptive_avg_pool2d(x, 1) has an integer form here")
        return _global_pool(b, name, _val(args[0], node))
    if t in (torch.mean, "mean"):
        v = _val(args[0], node)
        dims = _arg(args, kwargs, 1, "dim")
        keep = _arg(args, kwargs, 2, "keepdim", False)
        nd = v.example.dim()
        dims = sorted(d % nd for d in ((dims,) if isinstance(dims, int) else tuple(dims or ())))
        if nd != 4 or dims != [2, 3]:
            raise ConfigError(f"{name}: mean has an integer form over the spatial dims (2, 3) only, got {dims}")
        pooled = _global_pool(b, name, v)
        return pooled if keep else _reshape_flat(b, f"{name}.flatten", pooled, 1, -1)
    if t is F.interpolate:
        return _upsample(b, name, _val(args[0], node), _arg(args, kwargs, 1, "size"),
                         _arg(args, kwargs, 2, "scale_factor"), _arg(args, kwargs, 3, "mode", "nearest"))
    raise ConfigError(f"{name}: {node.op.replace('call_', '')} {_op_name(node)!r} has no integer form here")


def _relu(b: _Builder, name: str, v: _Val) -> _Val:
    if v.clip is not None:  # relu(clip(x, lo, hi)) = clip(x, max(lo, 0), max(hi, 0))
        return _Val(v.name, v.scale, v.bound, v.example, v.codes, v.divisor,
                    (v.clip[0].clamp_min(0), v.clip[1].clamp_min(0)))
    return b.unary("relu", name, v)


def _global_pool(b: _Builder, name: str, v: _Val) -> _Val:
    hw = v.example.shape[2] * v.example.shape[3]
    return b.unary("sumpool", name, v, {"global": True, "divisor": hw}, bound=v.bound * hw, divisor=hw)


def _avg_pool(b: _Builder, name: str, v: _Val, kernel, stride, padding, ceil_mode, count_include_pad,
              divisor_override) -> _Val:
    if ceil_mode or divisor_override is not None or not count_include_pad:
        raise ConfigError(f"{name}: average pooling needs ceil_mode=False, count_include_pad=True")
    kk = _pair(kernel)
    st = _pair(stride if stride is not None else kernel)
    n = kk[0] * kk[1]
    return b.unary("sumpool", name, v, {"kernel_size": kk, "stride": st, "padding": _pair(padding), "divisor": n},
                   bound=v.bound * n, divisor=n)


def _max_pool(b: _Builder, name: str, v: _Val, kernel, stride, padding, dilation, ceil_mode, return_indices) -> _Val:
    if ceil_mode or return_indices:
        raise ConfigError(f"{name}: max pooling needs ceil_mode=False and no indices")
    return b.unary("maxpool", name, v, {"kernel_size": _pair(kernel), "stride": _pair(stride or kernel),
                                        "padding": _pair(padding), "dilation": _pair(dilation)},
                   keep_codes=True, clip=v.clip)


def _upsample(b: _Builder, name: str, v: _Val, size, scale_factor, mode) -> _Val:
    if mode != "nearest":
        raise ConfigError(f"{name}: upsampling mode {mode!r} has no integer form here (nearest only)")
    h, w = v.example.shape[2], v.example.shape[3]
    if size is not None:
        oh, ow = _pair(size)
        if oh % h or ow % w:
            raise ConfigError(f"{name}: nearest upsampling to {(oh, ow)} from {(h, w)} is not by integer factors")
        sc = (oh // h, ow // w)
    else:
        f = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        if not all(float(x) == int(x) and int(x) >= 1 for x in f):
            raise ConfigError(f"{name}: nearest upsampling needs integer scale factors, got {scale_factor!r}")
        sc = (int(f[0]), int(f[1]))
    return b.unary("upsample", name, v, {"factor": sc}, keep_codes=True, clip=v.clip)


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _reshape_flat(b: _Builder, name: str, v: _Val, start: int, end: int) -> _Val:
    """``flatten(x, 1)`` (and every reshape to ``(N, -1)``)."""
    ex = v.example
    if start != 1 or end not in (-1, ex.dim() - 1):
        raise ConfigError(f"{name}: only flatten(x, 1) is supported")
    spatial = int(math.prod(ex.shape[2:])) if ex.dim() > 2 else 1

    def rep(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1)
        return t.repeat_interleave(spatial) if t.numel() > 1 and spatial > 1 else t

    clip = (rep(v.clip[0]), rep(v.clip[1])) if v.clip is not None else None
    s = rep(v.scale) if v.scale.dim() else v.scale
    return b.unary("flatten", name, v, {"start_dim": 1}, scale=s, keep_codes=True, clip=clip)



# ----------------------------------------------------------------------------------------------- comparison
@torch.no_grad()
def compare(qmodel: nn.Module, imodel: IntegerModel, batches: Iterable, *, max_batches: int | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Run the fake-quant model and the integer model on the same data and compare.

    Returns the output agreement (``max_abs_diff``, ``n_diff`` of output elements, ``top1`` of both and
    ``top1_agree`` on the labelled data) and, for every requantization, how many codes differ from the
    fake-quant model's codes at the same layer input (``codes_diff``) and the largest difference in LSB.
    """
    from tqdm.auto import tqdm

    was_training = qmodel.training  # compared in eval mode; the caller's mode is restored
    qmodel.eval()
    device = model_device(qmodel)
    layer_inputs: dict[str, torch.Tensor] = {}
    hooks = []
    req_for: dict[str, str] = {}
    for op in imodel.ops:
        if op.kind in ("conv2d", "linear"):
            req_for[op.inputs[0]] = op.name
    mods = dict(qmodel.named_modules())

    def hook(name):
        def f(mod, inp):
            iq = mod.input_quant
            x_hat = iq(inp[0])
            layer_inputs[name] = torch.round(x_hat / iq.scale.to(x_hat.dtype)).to(torch.int64).cpu()
        return f

    for op in imodel.ops:
        if op.kind in ("conv2d", "linear") and op.name in mods:
            hooks.append(mods[op.name].register_forward_pre_hook(hook(op.name)))
    tally = Tally()
    max_abs_diff, n_diff, n_out = 0.0, 0, 0
    try:
        it = tqdm(batches, desc="compare", leave=False, disable=not progress)
        for x, y in labelled_batches(it, max_batches):
            x = x.cpu()  # the integer model is the CPU reference; the fake-quant model runs where it lives
            y = None if y is None else y.cpu()
            layer_inputs.clear()
            fq = qmodel(x.to(device)).cpu()
            env = imodel.trace(imodel.quantize_input(x))
            out = imodel.dequantize(env[imodel.output_name])
            d = (out.double() - fq.double()).abs()
            max_abs_diff = max(max_abs_diff, float(d.max()))
            n_diff += int((d > 0).sum())
            n_out += d.numel()
            for vname, lname in req_for.items():
                if lname in layer_inputs:
                    tally.codes(lname, layer_inputs[lname], env[vname])
            tally.predictions(out, fq, y)
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    t = tally.totals()
    return {"images": tally.images, "max_abs_diff": max_abs_diff, "out_diff": n_diff, "out_elements": n_out,
            "top1_fake_quant": tally.top1("other"), "top1_integer": tally.top1("reference"),
            "prediction_agree": tally.prediction_agree,
            "codes": t["codes"], "codes_diff": t["codes_diff"], "max_code_lsb": t["max_code_lsb"],
            "layers": tally.layers}

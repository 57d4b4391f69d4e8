"""Conversion-time state of :func:`hwquant.export.integer_model`: the metadata of each integer value (``Val``)
and the ``Builder`` that emits the integer operations (:mod:`hwquant.export.intops`) for requantizations,
layers, adds, pools, clips and lookup tables; :mod:`hwquant.export.convert` walks the traced graph and calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.layers import QuantConv2d, QuantLinear, QuantLUTAct
from ..nn.quantizer import FakeQuantizer
from ..numerics.codes import qrange
from .intops import ADD_BITS, EXACT_F64, MAX_M_BITS, IntOp, requant_params, value_bits

__all__ = ["NO_CLIP", "Builder", "Val", "scale_vec"]

NO_CLIP = 2.0**62  # "no bound" in integer clamp bounds


@dataclass
class Val:
    """Conversion-time metadata of one integer value."""

    name: str
    scale: torch.Tensor  # float64, 1-D per channel (dim 1) or 0-d
    bound: float
    example: torch.Tensor  # int64 example value (shapes)
    codes: tuple | None = None  # (s_out float32 0-d, qmin, qmax) when these are stored codes
    divisor: int = 1  # a sum pool's window size: the real value is V * scale / divisor
    clip: tuple[torch.Tensor, torch.Tensor] | None = None  # carried clip (lo, hi), real units, 0-d or per channel

    def with_clip(self, lo: float, hi: float) -> Val:
        """This value clipped to ``[lo, hi]`` (intersected with a clip it already carries)."""
        lo_t, hi_t = torch.tensor(float(lo), dtype=torch.float64), torch.tensor(float(hi), dtype=torch.float64)
        if self.clip is not None:
            lo_t, hi_t = torch.maximum(self.clip[0], lo_t), torch.minimum(self.clip[1], hi_t)
        return Val(self.name, self.scale, self.bound, self.example, self.codes, self.divisor, (lo_t, hi_t))



def scale_vec(s: torch.Tensor, channels: int) -> torch.Tensor:
    s = s.double().reshape(-1)
    return s.expand(channels).clone() if s.numel() == 1 else s


class Builder:
    """Emits the integer ops of one conversion (``ops``) and keeps every value's :class:`Val` (``vals``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.mods = dict(model.named_modules())
        self.ops: list[IntOp] = []
        self.vals: dict[str, Val] = {}
        self.count: dict[str, int] = {}
        self.input_name: str | None = None  # the model input's value (the only one a gained quantizer may read)

    def _fresh(self, base: str) -> str:
        n = self.count.get(base, 0)
        self.count[base] = n + 1
        return base if n == 0 else f"{base}.{n}"

    def emit(self, op: IntOp, example: torch.Tensor, codes=None, divisor: int = 1) -> Val:
        op.shape = tuple(example.shape)
        self.ops.append(op)
        v = Val(op.name, op.scale, op.bound, example, codes, divisor)
        self.vals[op.name] = v
        return v

    def requant(self, v: Val, q: FakeQuantizer, where: str) -> Val:
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
        ratio = scale_vec(v.scale, c) / s_req.double()
        m_bits = min(MAX_M_BITS, 62 - value_bits(v.bound))
        max_shift = 62 - value_bits(v.divisor)
        m, n = requant_params(ratio, m_bits)
        if int(n.max()) > max_shift:  # a tiny ratio: fewer multiplier bits keep the shift in range
            m_bits -= int(n.max()) - max_shift
            m, n = requant_params(ratio, max(m_bits, 1))
        if m_bits < 12:
            raise ConfigError(f"{where}: value of {value_bits(v.bound)} bits leaves no room for a requant multiplier")
        if m.numel() > 1 and bool((m == m[0]).all() and (n == n[0]).all()):
            m, n = m[:1], n[:1]
        params = {"multiplier": m, "shift": n, "divisor": v.divisor, "qmin": qmin, "qmax": qmax,
                  "out_scale": float(s_out), "bits": q.spec.bits, "signed": bool(q.signed)}
        if q.windowed:
            params["base_qmin"], params["base_qmax"] = qrange(q.spec.q_step_bits, bool(q.signed))
            params["base_scale"] = float(s_req)
            params["base_bits"] = q.spec.q_step_bits
            params["window_shift"] = int(q.window_shift)
        if v.divisor == 1 and v.bound * float(m.max()) < EXACT_F64:  # a faster exact evaluation (see IntOp.run)
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

    def materialize(self, v: Val, where: str) -> Val:
        """Apply a carried clip to ``V`` itself (a ``clamp`` op; see the module docstring)."""
        if v.clip is None:
            return v
        if v.divisor != 1:
            raise ConfigError(f"{where}: an average pool's output must go (through flatten) to a quantized layer")
        c = v.example.shape[1] if v.example.dim() > 1 else 1
        s = scale_vec(v.scale, c)
        lo = torch.ceil(v.clip[0] / s).clamp(-NO_CLIP, NO_CLIP).to(torch.int64)
        hi = torch.floor(v.clip[1] / s).clamp(-NO_CLIP, NO_CLIP).to(torch.int64)
        if lo.numel() > 1 and bool((lo == lo[0]).all() and (hi == hi[0]).all()):
            lo, hi = lo[:1], hi[:1]
        bound = min(v.bound, float(torch.maximum(lo.abs(), hi.abs()).max()))
        op = IntOp("clamp", self._fresh(f"{where}.clamp"), (v.name,), {"lo": lo, "hi": hi}, scale=v.scale,
                   bound=bound)
        return self.emit(op, op.run(v.example))

    def concat(self, name: str, vals: list[Val], dim: int) -> Val:
        ex = vals[0].example
        dim = dim % ex.dim()
        if any(v.divisor != 1 for v in vals):
            raise ConfigError(f"{name}: an average pool's output must go (through flatten) to a quantized layer")
        chans = [v.example.shape[1] if v.example.dim() > 1 else 1 for v in vals]
        vecs = [scale_vec(v.scale, c) for v, c in zip(vals, chans, strict=True)]
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

    def lut(self, name: str, m: QuantLUTAct, v: Val) -> Val:
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

    def layer(self, name: str, m: QuantConv2d | QuantLinear, v: Val) -> Val:
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
        if bound >= EXACT_F64:
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

    def add(self, name: str, a: Val, b: Val) -> Val:
        if a.divisor != 1 or b.divisor != 1:
            raise ConfigError(f"{name}: an average pool's output must go (through flatten) to a quantized layer")
        a, b = self.materialize(a, name), self.materialize(b, name)
        c = a.example.shape[1] if a.example.dim() > 1 else 1
        sa, sb = scale_vec(a.scale, c), scale_vec(b.scale, c)
        fine, coarse = torch.minimum(sa, sb), torch.maximum(sa, sb)
        r = coarse / fine
        if bool((r == torch.round(r)).all()):
            f = 0  # integer ratios (power-of-two scales): exact with no extra fraction bits
        else:
            f = max(0, ADD_BITS - 1 - math.floor(math.log2(float(r.min()))))
        s_out = fine / 2.0**f
        ka = torch.round(sa / s_out).to(torch.int64)
        kb = torch.round(sb / s_out).to(torch.int64)
        bound = float((ka.double() * a.bound + kb.double() * b.bound).max())
        if bound >= 2**62:
            raise ConfigError(f"{name}: residual sum needs more than 62 bits")
        op = IntOp("add", self._fresh(name), (a.name, b.name), {"k_a": ka, "k_b": kb, "frac_bits": f},
                   scale=s_out, bound=bound)
        return self.emit(op, op.run(a.example, b.example))

    def unary(self, kind: str, name: str, v: Val, params=None, scale=None, bound=None, keep_codes=False,
              divisor: int | None = None, clip=None) -> Val:
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


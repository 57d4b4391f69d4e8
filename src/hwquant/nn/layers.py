"""Quantized layers: float layers whose input and weight pass through :class:`FakeQuantizer` s.

``QuantConv2d`` / ``QuantLinear`` compute ``op(Q_a(x), Q_w(W)) + Q_b(b)`` where the bias, when both
input and weight are quantized, is quantized to ``bias_bits`` (default 32) at the accumulator scale
``s_b = s_a * s_w`` (per output channel): exactly what an integer datapath adds to its int32 accumulator.

A layer may instead carry its own calibrated ``bias_quant`` (e.g. a fixed-point bias with its own
fractional length FL_b).  The bias is then stored with ``bias_quant``'s bits at the scale
``max(s_b_own, s_a * s_w)``: a bias finer than the accumulator cannot be added without rounding, so the
coarser of the two steps is what the hardware really adds (FL_b = min(FL_b_own, FL_w + FL_a)).

**Evaluation computes on codes.**  In eval mode without autograd (``model.eval()`` under ``torch.no_grad()``,
as :func:`~hwquant.train.evaluate` runs) a layer whose input and weight are both quantized (zero point 0)
computes what an integer datapath computes: the codes ``q_x = round(x_hat / s_x)``, ``q_w = round(w_hat / s_w)``
(exact recoveries of the fake-quantizers' codes), the accumulator ``A = op(q_x, q_w) + B`` on integers
(exact: float32 while the worst case ``K * max|q_x| * max|q_w| + max|B|`` is below ``2^24``, else two float32
passes on a split of the weight codes or float64, see :func:`exact_integer_op`),
and one rounding ``y = fl32(fl64(A) * fl64(s_acc))`` with ``s_acc = fl32(s_x * s_w)`` and ``B`` the bias codes
in accumulator units.  :func:`hwquant.export.integer_model` produces ``A`` with integer arithmetic, so the
two agree bit for bit at every layer output; in training the float path (``op(x_hat, w_hat) + b_hat``, whose
float32 sums round differently) keeps the usual gradients.  A layer with no integer accumulator (a float
bias, a bias step that is not a multiple of ``s_x * s_w``, per-channel input steps) evaluates on the float path;
:meth:`~_QuantMixin.no_integer_form` says which layers and why (:func:`hwquant.nn.float_eval_layers` lists them).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.codes import qrange, shape_param
from ..numerics.fused import fake_quantize_trusted
from ..spec import QuantSpec
from .quantizer import FakeQuantizer

ACT_AXIS = 1  # the channel axis of activations (N, C, H, W) and (N, F)


@contextlib.contextmanager
def exact_float_sums(on_cuda: bool):
    """TF32 off for the block when computing on CUDA: integer sums in float32 are exact only with full float32
    products (cuDNN convolutions use TF32 by default, which keeps 10 mantissa bits).  Restored afterwards."""
    if not on_cuda:
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


F32_EXACT = 2**24  # float32 holds every integer below this exactly


def _row_bound(w: torch.Tensor, x_bound: float) -> float:
    """The largest ``sum |w_o| * x_bound`` over output channels ``o``: a bound on every partial sum."""
    return float(w.reshape(w.shape[0], -1).abs().sum(dim=1).max()) * x_bound if w.numel() else 0.0


def exact_integer_op(op, x: torch.Tensor, w: torch.Tensor, x_bound: float) -> torch.Tensor:
    """``op(x, w)`` (a convolution or linear map without bias) of integer-valued ``x`` (``|x| <= x_bound``)
    and ``w``, exactly, in float32 where the bound allows and float64 otherwise.

    A float sum of integers is exact while every partial sum stays below ``2^24`` (float32).  When the
    worst case ``max_o sum |w_o| * x_bound`` does not, ``w`` is split into ``B * hi + lo`` (``B = 2^e``,
    ``hi = round(w / B)``, ``|lo| <= B / 2``) with the smallest ``e`` whose two halves each keep their sums
    below ``2^24``: two float32 operations (fast kernels; CPU convolutions in float64 take a slow path, ~10x)
    combined exactly in float64, ``B * op(x, hi) + op(x, lo)``.  Where no split fits, one float64 operation
    (exact below ``2^53``).  Returns float32 for a single float32 operation, else float64.  CUDA: TF32 off.
    """
    with exact_float_sums(x.is_cuda):
        if _row_bound(w, x_bound) < F32_EXACT:
            return op(x.float(), w.float())
        xf, wd = x.float(), w.double()
        for e in range(1, 32):
            hi = torch.round(wd / 2.0**e)
            if _row_bound(hi, x_bound) < F32_EXACT:
                lo = wd - hi * 2.0**e
                if _row_bound(lo, x_bound) < F32_EXACT:
                    return op(xf, hi.float()).double().mul_(2.0**e).add_(op(xf, lo.float()).double())
                break  # lo only grows with e
        return op(x.double(), w.double())


class _QuantMixin:
    """Shared parts of the quantized layers."""

    input_quant: FakeQuantizer | None
    weight_quant: FakeQuantizer | None
    bias_bits: int | None

    def _init_quant(self, weight_spec, act_spec, bias_bits, generator=None) -> None:
        self.weight_quant = FakeQuantizer(weight_spec, axis=0, generator=generator) if weight_spec else None
        # activations: per-channel means axis 1 (N, C, ...), never the batch axis 0
        self.input_quant = FakeQuantizer(act_spec, axis=ACT_AXIS, generator=generator) if act_spec else None
        self.bias_bits = bias_bits
        self.bias_quant: FakeQuantizer | None = None

    def bias_scale(self) -> torch.Tensor | None:
        """Accumulator scale ``s_a * s_w`` (per output channel), or ``None`` if bias stays float."""
        iq, wq = self.input_quant, self.weight_quant
        if self.bias is None or self.bias_bits is None or iq is None or wq is None:
            return None
        if not (iq.enabled and iq.calibrated and wq.enabled and wq.calibrated):
            return None
        if iq.axis is not None:  # one step per input channel: the sum over channels has no common step
            return None
        s = iq.scale * wq.scale
        s = s.expand(self.bias.shape[0]).contiguous() if s.dim() == 0 else s
        bq = self.bias_quant
        if bq is not None and bq.enabled and bq.calibrated:
            s = torch.maximum(s, bq.scale.expand_as(s))
        return s

    def bias_code_bits(self) -> int:
        bq = self.bias_quant
        if bq is not None and bq.enabled and bq.calibrated:
            return bq.spec.bits
        return self.bias_bits

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def quantized_bias(self) -> torch.Tensor | None:
        s = self.bias_scale()
        if s is None:
            return self.bias
        # s is a product of validated steps (finite, > 0); skip the per-call argument checks
        qmin, qmax = qrange(self.bias_code_bits(), True)
        return fake_quantize_trusted(self.bias, s.to(self.bias.dtype), None, qmin, qmax, "nearest", None, 0)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def quantized_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(quantized_weight(), quantized_bias())`` (after the input quantizer's step of this forward), in one
        kernel call where the weight quantizer offers it (:meth:`FakeQuantizer.forward_with_bias`: a QAT weight
        and a bias at the accumulator step ``s_a * s_w``), with the same values and gradients."""
        wq, iq, bq = self.weight_quant, self.input_quant, self.bias_quant
        if (wq is not None and self.bias is not None and self.bias_bits is not None and iq is not None
                and iq.enabled and iq.calibrated and iq.axis is None
                and (bq is None or not (bq.enabled and bq.calibrated))):
            qmin, qmax = qrange(self.bias_bits, True)
            out = wq.forward_with_bias(self.weight, self.bias, iq.scale, qmin, qmax)
            if out is not None:
                return out
        return self.quantized_weight(), self.quantized_bias()

    # ----------------------------------------------------------- integer (exact) evaluation
    def accumulator_scale(self) -> torch.Tensor | None:
        """``fl32(s_x * s_w)`` per output channel (1-D), or ``None`` unless input and weight are quantized
        with zero point 0 (the only case with an integer accumulator)."""
        iq, wq = self.input_quant, self.weight_quant
        if iq is None or wq is None or not (iq.enabled and iq.calibrated and wq.enabled and wq.calibrated):
            return None
        if not (iq.spec.symmetric and wq.spec.symmetric) or iq.axis is not None or wq.axis not in (None, 0):
            return None
        s = (iq.scale.float() * wq.scale.float()).reshape(-1)
        return s.expand(self.weight.shape[0]).contiguous() if s.numel() == 1 else s

    def bias_codes(self, acc_scale: torch.Tensor) -> torch.Tensor | None:
        """The bias as integers in accumulator units (float tensor holding integers), or ``None`` if the
        layer has no bias.  Raises ``ValueError`` when the bias step is not an integer multiple of the
        accumulator step (it cannot be added to the accumulator exactly)."""
        if self.bias is None:
            return None
        s_b = self.bias_scale()
        if s_b is None:
            raise ValueError("the bias is not quantized (bias_bits=None): no integer accumulator")
        qmin, qmax = qrange(self.bias_code_bits(), True)
        q = torch.round(self.bias.detach().float() * torch.reciprocal(s_b.float())).clamp_(qmin, qmax)
        ratio = (s_b.double() / acc_scale.double())
        k = torch.round(ratio)
        if not torch.equal(ratio, k):
            raise ValueError("bias step is not an integer multiple of the accumulator step s_x * s_w")
        return q * k.float()

    def no_integer_form(self) -> str | None:
        """Why this layer has no integer accumulator (``None`` when it has one): evaluation then computes in
        float (``op(x_hat, w_hat) + b_hat``) and :func:`hwquant.export.integer_model` refuses the layer with
        this reason.  Checked explicitly, so no error inside the integer path is ever taken for an answer."""
        s_acc = self.accumulator_scale()
        if s_acc is None:
            return "input and weight are not both quantized symmetrically (one step per tensor / output channel)"
        if self.bias is None:
            return None
        s_b = self.bias_scale()
        if s_b is None:
            return "the bias is not quantized (bias_bits=None): no integer accumulator"
        ratio = s_b.double() / s_acc.double()
        if not torch.equal(ratio, torch.round(ratio)):
            return "bias step is not an integer multiple of the accumulator step s_x * s_w"
        return None

    def _exact_ok(self) -> bool:
        return not self.training and not torch.is_grad_enabled() and self.no_integer_form() is None

    def _exact_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        iq, wq = self.input_quant, self.weight_quant
        x_hat, w_hat = self.quantized_input(x), self.quantized_weight()
        qx = (x_hat / iq.scale.to(x_hat.dtype)).round_()  # x_hat itself untouched: hooks may hold it
        qw = torch.round(w_hat / shape_param(wq.scale.to(w_hat.dtype), w_hat, wq.axis))
        s_acc = self.accumulator_scale()
        qb = self.bias_codes(s_acc)  # representable: no_integer_form() said so
        qmin, qmax = qrange(iq.spec.bits, bool(iq.signed), iq.spec.narrow)
        k = self.weight[0].numel()
        bound = k * max(-qmin, qmax) * float(qw.abs().amax()) + (0.0 if qb is None else float(qb.abs().amax()))
        shape = (1, -1) + (1,) * (qx.dim() - 2)
        if bound >= F32_EXACT:  # beyond float32 in one pass (see exact_integer_op), the bias added in float64
            acc = exact_integer_op(lambda a, b: op(a, b, None), qx, qw, float(max(-qmin, qmax))).double()
            if qb is not None:
                acc += qb.double().reshape(shape)
            return (acc * s_acc.double().reshape(shape)).to(x.dtype)
        with exact_float_sums(qx.is_cuda):
            acc = op(qx.float(), qw.float(), None if qb is None else qb.float())
        if x.dtype == torch.float32:
            # acc holds integers below 2^24 and s_acc is float32: their product in double is exact, so rounding
            # it to float32 gives the correctly rounded float32 product, which is what one float32 multiply
            # returns (IEEE 754): the same bits as the double route below, without two copies in double
            return acc.mul_(s_acc.reshape(shape))
        return (acc.double() * s_acc.double().reshape(shape)).to(x.dtype)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input, weight (per output channel axis 0) and bias."""

    def __init__(self, *args, weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                 bias_bits: int | None = 32, generator: torch.Generator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_spec, act_spec, bias_bits, generator)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_spec: QuantSpec | None, act_spec: QuantSpec | None,
                   bias_bits: int | None = 32, generator: torch.Generator | None = None) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, weight_spec=weight_spec, act_spec=act_spec, bias_bits=bias_bits,
                generator=generator, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact_ok():
            return self._exact_forward(x, self._conv_forward)
        return self._conv_forward(self.quantized_input(x), *self.quantized_weight_and_bias())


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input, weight (per output feature axis 0) and bias."""

    def __init__(self, *args, weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                 bias_bits: int | None = 32, generator: torch.Generator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_spec, act_spec, bias_bits, generator)

    @classmethod
    def from_float(cls, lin: nn.Linear, weight_spec: QuantSpec | None, act_spec: QuantSpec | None,
                   bias_bits: int | None = 32, generator: torch.Generator | None = None) -> QuantLinear:
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, weight_spec=weight_spec,
                act_spec=act_spec, bias_bits=bias_bits, generator=generator,
                device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(lin.weight)
            if lin.bias is not None:
                q.bias.copy_(lin.bias)
        q.train(lin.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact_ok():
            return self._exact_forward(x, F.linear)
        return F.linear(self.quantized_input(x), *self.quantized_weight_and_bias())


class QuantAct(nn.Module):
    """A standalone activation quantizer (e.g. after a residual add): ``x -> Q(x)``."""

    def __init__(self, spec: QuantSpec, generator: torch.Generator | None = None):
        super().__init__()
        self.quant = FakeQuantizer(spec, axis=ACT_AXIS, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


#: Elementwise activations that :class:`QuantLUTAct` replaces (the float module is kept inside it).
LUT_ACTIVATIONS = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU)


class QuantLUTAct(nn.Module):
    """An elementwise activation between two quantizers: ``y = Q_out(f(Q_in(x)))`` (hardswish, hardsigmoid,
    SiLU, sigmoid, tanh, GELU, leaky ReLU, ELU).

    On hardware this is a lookup table: the input is a ``b``-bit code ``q_x`` (scale ``s_x``), the output the
    code ``q_y = LUT[q_x - q_min]`` of ``Q_out`` (scale ``s_y``), ``2^b`` entries.  The table is built by
    :meth:`table` from the same float operations the fake-quant forward runs (``f`` on ``q_x * s_x``, then
    ``Q_out``'s rounding), so the integer model, the ONNX ``Gather`` and the fake-quant model agree code for
    code by construction, whatever the scales (no power-of-two condition).  For hardswish this is the integer
    piecewise function ``q_y = round(q_x * clamp(q_x + 3/s_x, 0, 6/s_x) * s_x^2 / (6 s_y))`` evaluated once
    per code; a ROM of ``2^b`` words is what the datapath stores instead of a multiplier.  Training passes
    gradients through both quantizers (straight-through) and ``f``.
    """

    def __init__(self, act: nn.Module, spec: QuantSpec, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(act, LUT_ACTIVATIONS):
            names = ", ".join(c.__name__ for c in LUT_ACTIVATIONS)
            raise TypeError(f"QuantLUTAct wraps one of {names}, got {type(act).__name__}")
        self.act = act
        self.input_quant = FakeQuantizer(spec, axis=ACT_AXIS, generator=generator)
        self.output_quant = FakeQuantizer(spec, axis=ACT_AXIS, generator=generator)

    def _calibrated(self) -> bool:
        iq, oq = self.input_quant, self.output_quant
        return iq.enabled and iq.calibrated and oq.enabled and oq.calibrated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled() and self._calibrated():
            # evaluation on codes, as the hardware does: one table lookup (see table())
            lut, qmin = self.table()
            q = self.input_quant.codes(x).to(torch.int64) - qmin
            return lut[q].to(x.dtype) * self.output_quant.scale.to(x.dtype).reshape(())
        return self.output_quant(self.act(self.input_quant(x)))

    @torch.no_grad()
    def table(self) -> tuple[torch.Tensor, int]:
        """``(LUT, q_min)``: the output code (int64) of every input code ``q_min .. q_max`` of ``Q_in``."""
        iq, oq = self.input_quant, self.output_quant
        if not self._calibrated():
            raise ValueError("the activation's quantizers are not calibrated")
        qmin, qmax = qrange(iq.spec.bits, bool(iq.signed), iq.spec.narrow)
        codes = torch.arange(qmin, qmax + 1, dtype=torch.float32, device=iq.scale.device)
        x_hat = codes * iq.scale.float().reshape(())  # what Q_in returns for each code (fl32(q * s))
        return oq.codes(self.act(x_hat)).to(torch.int64), qmin

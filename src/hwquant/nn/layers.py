"""Quantized layers: float layers whose input and weight pass through :class:`FakeQuantizer` s.

``QuantConv2d`` / ``QuantLinear`` compute ``op(Q_a(x), Q_w(W)) + Q_b(b)`` where the bias, when both
input and weight are quantized, is quantized to ``bias_bits`` (default 32) at the accumulator scale
``s_b = s_a * s_w`` (per output channel): exactly what an integer datapath adds to its int32 accumulator.

A layer may instead carry its own calibrated ``bias_quant`` (e.g. a fixed-point bias with its own
fractional length FL_b).  The bias is then stored with ``bias_quant``'s bits at the scale
``max(s_b_own, s_a * s_w)``: a bias finer than the accumulator cannot be added without rounding, so the
coarser of the two steps is what the hardware really adds (FL_b = min(FL_b_own, FL_w + FL_a)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.uniform import fake_quantize_trusted, qrange
from ..spec import QuantSpec
from .quantizer import FakeQuantizer


class _QuantMixin:
    """Shared parts of the quantized layers."""

    input_quant: FakeQuantizer | None
    weight_quant: FakeQuantizer | None
    bias_bits: int | None

    def _init_quant(self, weight_spec, act_spec, bias_bits, generator=None) -> None:
        self.weight_quant = FakeQuantizer(weight_spec, axis=0, generator=generator) if weight_spec else None
        self.input_quant = FakeQuantizer(act_spec, generator=generator) if act_spec else None
        self.bias_bits = bias_bits
        self.bias_quant: FakeQuantizer | None = None

    def bias_scale(self) -> torch.Tensor | None:
        """Accumulator scale ``s_a * s_w`` (per output channel), or ``None`` if bias stays float."""
        iq, wq = self.input_quant, self.weight_quant
        if self.bias is None or self.bias_bits is None or iq is None or wq is None:
            return None
        if not (iq.enabled and iq.calibrated and wq.enabled and wq.calibrated):
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
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.quantized_bias())


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
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.quantized_bias())


class QuantAct(nn.Module):
    """A standalone activation quantizer (e.g. after a residual add): ``x -> Q(x)``."""

    def __init__(self, spec: QuantSpec, generator: torch.Generator | None = None):
        super().__init__()
        self.quant = FakeQuantizer(spec, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x)


QUANT_LAYERS = (QuantConv2d, QuantLinear)

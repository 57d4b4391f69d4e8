"""``FakeQuantizer``: the one module that holds a tensor's quantization state.

A quantizer has three switches:

* ``observing``: feed every input to a calibration observer (see :mod:`hwquant.observers`);
* ``enabled``: fake-quantize (``(q - z) * s``) instead of passing the value through;
* its parameters (``scale``, ``zero_point`` buffers, and the resolved sign), set by :meth:`calibrate`
  or :meth:`set_params` and saved in ``state_dict``.

How the scale evolves in training is the spec's ``range_mode`` (QAT); with ``Q = spec.clip_levels``:

* ``static``: the calibrated ``scale`` is kept (PTQ).
* ``dynamic``: every forward ``s = clip_ratio * peak(x) / Q`` with ``peak = max|x|`` (signed) or ``max x``
  (unsigned), per tensor or per channel (weights that change every step).
* ``ema``: in training mode ``m <- d * m + (1 - d) * peak(x)`` (``d = spec.ema_decay``; ``m`` starts at the
  calibration peak), ``s = clip_ratio * m / Q``; in eval mode the last ``s`` is used (activations).
* ``learned``: LSQ (Esser et al. 2020): ``s`` is the parameter ``step``, trained with the LSQ gradient scaled
  by ``1 / sqrt(n * q_max)`` (``n`` elements per scale).
* ``pact``: PACT (Choi et al. 2018): the parameter ``alpha`` is the clip, ``s = alpha / Q``, trained with
  PACT's gradient (see :func:`~hwquant.numerics.uniform.pact_fake_quantize`).

``clip_ratio`` (``dynamic`` / ``ema``) is fixed at calibration: the observer's clip over the observed peak
(1 for min-max, < 1 for an MSE or percentile clip), so the clip keeps following the peak in training.
After every forward ``scale`` holds the step that was used, so ``codes``, ``params`` and export read one
place whatever the mode.

A bit-window quantizer (``spec.clip_at="window"``, :mod:`hwquant.numerics.window`) also holds
``window_shift``, the shift ``s`` its observer chose: ``scale`` is the effective step ``2^s * d8``, the tracked
modes keep ``clip_ratio = 2^s`` (``d8`` follows the peak of the ``step_bits`` range), and codes are the
two-stage ``sat_bits(rne(sat_8(rne(x / d8)) / 2^s))``.

**Input gain** (``input_gain``, default 1; :meth:`set_input_gain`): a float32 factor ``g`` applied to the
input before anything else, in every mode and also when the quantizer is off (``forward(x) = q(fl32(x * g))``,
``codes(x) = codes(fl32(x * g))``).  It exists for the quantizer of the model input: the host scales the
normalised image by ``g`` (a change of the normalisation's constants, so free) and the layer that reads it holds
weights ``W / g`` (:func:`~hwquant.nn.fold.fold_input_gain`), so a non-power-of-two image step becomes a
power-of-two step on the scaled image and the integer datapath keeps shifts only.  Integer export refuses a
gain anywhere else (inside the datapath it would be a multiplier).  Saved in the extra state.

**ReLU input** (``relu_input``, default off; set by :func:`hwquant.nn.absorb_relus`): while it quantizes
(enabled, calibrated, not observing: :attr:`applies_relu`) the quantizer quantizes ``relu(x)``
(``forward(x) = q(relu(x))``; ``codes(x) = codes(relu(x))`` always); off or observing it passes ``x`` on as
before.  The ReLU module that feeds it skips its own pass exactly when every quantizer it feeds applies it, so
the ReLU runs once either way (``relu`` is idempotent: a quantizer that applies it to an input the ReLU module
already rectified changes nothing).  Where the fused kernel runs (per tensor, zero point 0, ``static`` /
``dynamic`` / ``ema``) ReLU, the peak and the quantization share its passes, bit for bit what ``torch.relu``
followed by the quantizer computes, forward and backward; elsewhere ``torch.relu`` runs first.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ..collectives import all_reduce_, distributed
from ..numerics import fused_relu
from ..numerics.codes import check_scale, code_dtype, qrange, shape_param
from ..numerics.fused import fake_quantize_trusted
from ..numerics.fused_weight import fake_quantize_dynamic
from ..numerics.uniform import quantize
from ..numerics.window import window_codes, window_fake_quantize
from ..observers import make_observer
from ..spec import QuantParams, QuantSpec

_TINY = torch.finfo(torch.float32).tiny


def _pow2_(s: torch.Tensor) -> torch.Tensor:
    """``s <- 2^round(log2 s)`` in place (nearest power of two in the log domain)."""
    return s.log2_().round_().exp2_()


class GradScale(torch.autograd.Function):
    """Identity forward, gradient times ``g`` backward (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x, g):  # noqa: D401
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor according to a :class:`~hwquant.spec.QuantSpec`.

    Args:
        spec: bits, sign, granularity, rounding, observer.
        axis: channel axis for ``granularity="channel"`` (default 0, the output channel of a weight).
        generator: random source for stochastic rounding (``None``: torch's global generator).
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.spec = spec
        self.axis = (0 if axis is None else axis) if spec.granularity == "channel" else None
        self.generator = generator
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.signed: bool | None = spec.signed
        self.enabled = False
        self.observing = False
        self.observer = None
        self.calib_info: dict = {}  # observer.summary() of the last calibration, for reports
        self._checked: torch.Tensor | None = None  # the scale tensor last validated by forward
        self.input_gain = 1.0  # a float32 value (see the module docstring)
        self.relu_input = False  # quantize relu(x) (see the module docstring; structure, not saved state)
        self._handoff: tuple | None = None  # (weakref to relu(x), its version, its quantized copy): relu_pair
        mode = spec.range_mode
        if mode in ("dynamic", "ema"):
            self.register_buffer("clip_ratio", torch.empty(0))
        if mode == "ema":
            self.register_buffer("running_max", torch.empty(0))
        if mode == "learned":
            self.step = nn.Parameter(torch.empty(0))
        if mode == "pact":
            self.alpha = nn.Parameter(torch.empty(0))
        if spec.clip_at == "window":
            self.register_buffer("window_shift", torch.zeros((), dtype=torch.int64))

    # ----------------------------------------------------------------- state
    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    @property
    def quantizing(self) -> bool:
        """Whether the forward quantizes now: enabled, calibrated, not observing."""
        return self.enabled and self.calibrated and not self.observing

    @property
    def applies_relu(self) -> bool:
        """Whether the forward quantizes ``relu(x)`` now: ``relu_input`` and quantizing (see the module
        docstring); what an absorbed ReLU module checks before it skips its pass."""
        return self.relu_input and self.quantizing

    def _check_new_scale(self) -> None:
        """Validate a newly installed scale once, not every forward (eagerly: a compiled graph runs after an eager
        forward or a load has checked it, and a data-dependent check would break the graph)."""
        if self._checked is not self.scale and not torch.compiler.is_compiling():
            check_scale(self.scale)
            self._checked = self.scale

    @property
    def windowed(self) -> bool:
        """Whether this is a bit-window quantizer (``spec.clip_at == "window"``)."""
        return self.spec.clip_at == "window"

    def base_step(self) -> torch.Tensor:
        """A window quantizer's ``step_bits`` step ``d8 = scale / 2^shift`` (exact: a power-of-two divisor)."""
        return self.scale / 2.0 ** int(self.window_shift)

    def set_params(self, params: QuantParams, peak: torch.Tensor | None = None, shift: int | None = None) -> None:
        """Install calibrated parameters and enable quantization.

        ``shift``: a window quantizer's shift (``scale`` is then the effective step ``2^shift * d8``).

        For the training range modes this also sets their state: ``clip_ratio = scale * Q / peak`` and the
        EMA's ``running_max = peak`` (``peak``: the observed ``max|x|`` / ``max x``; needed for
        ``dynamic`` / ``ema``), LSQ's ``step = scale``, PACT's ``alpha = scale * Q``.
        """
        device = self.scale.device  # the module's device (buffers follow .to()); params may come from the CPU
        self.scale = params.scale.detach().to(device, torch.float32).clone()
        if self.spec.pow2:
            _pow2_(self.scale)
        self.zero_point = params.zero_point.detach().to(device, torch.int32).clone()
        self.signed = params.signed
        self.enabled = True
        mode = self.spec.range_mode
        q = float(self.spec.clip_levels(params.signed))
        if self.windowed:
            limit = self.spec.q_step_bits - self.spec.bits
            if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= limit:
                raise ValueError(f"a window quantizer needs a shift in 0..{limit}, got {shift!r}")
            self.window_shift = torch.tensor(shift, dtype=torch.int64, device=device)
        if mode in ("dynamic", "ema"):
            if peak is None:
                raise ValueError(f"range_mode={mode!r} needs the observed peak to set clip_ratio")
            peak = peak.detach().to(self.scale.device, torch.float32).reshape(self.scale.shape)
            s_obs = params.scale.detach().to(self.scale.device, torch.float32).reshape(self.scale.shape)
            if self.windowed:  # the 8-bit step follows the peak; the window stays 2^shift above it
                ratio = torch.where(peak > 0, torch.full_like(peak, 2.0 ** shift), torch.ones_like(peak))
            else:
                ratio = torch.where(peak > 0, s_obs * q / peak.clamp_min(1e-30), torch.ones_like(peak))
            self.clip_ratio = ratio.clone()
            if mode == "ema":
                self.running_max = peak.clone()
        elif mode == "learned":  # in place: an optimizer made before a lazy init keeps the same parameter
            self.step.data = self.scale.clone()
        elif mode == "pact":
            self.alpha.data = (self.scale * q).clone()

    def params(self) -> QuantParams:
        """The current parameters as a :class:`QuantParams` (raises if not calibrated)."""
        if not self.calibrated:
            raise RuntimeError("quantizer is not calibrated")
        return QuantParams(self.scale, self.zero_point, self.spec.bits, bool(self.signed), self.axis, self.spec.narrow)

    def set_input_gain(self, gain: float) -> float:
        """Set the input gain (rounded to float32; finite and > 0); returns the value set."""
        g = float(gain) if isinstance(gain, (int, float)) and not isinstance(gain, bool) else math.nan
        g32 = float(torch.tensor(g, dtype=torch.float32)) if math.isfinite(g) else math.nan
        if not (math.isfinite(g32) and g32 > 0):
            raise ValueError(f"an input gain must be a finite number > 0 (in float32), got {gain!r}")
        self.input_gain = g32
        return g32

    def get_extra_state(self) -> dict:
        return {"signed": self.signed, "enabled": self.enabled, "input_gain": self.input_gain}

    def set_extra_state(self, state: dict) -> None:
        self.signed = state["signed"]
        self.enabled = state["enabled"]
        self.set_input_gain(state.get("input_gain", 1.0))  # checkpoints from before the gain: 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers start empty and take the checkpoint's shapes (per-tensor or per-channel).
        for name in ("scale", "zero_point", "clip_ratio", "running_max"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        for name in ("step", "alpha"):
            key = prefix + name
            if key in state_dict:  # resized in place, so an optimizer holding the parameter stays valid
                getattr(self, name).data = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------- calibration
    def start_observing(self) -> None:
        self.observer = make_observer(self.spec, self.axis)
        self.observing = True

    def calibrate(self) -> QuantParams:
        """Turn what the observer saw into parameters, install them, stop observing."""
        params = self.observer.compute()
        self.calib_info = self.observer.summary()
        peak = self.observer.peak_seen(params.signed) if self.spec.range_mode in ("dynamic", "ema") else None
        if self.windowed:
            self.set_params(params, peak, self.observer.shift)
        else:  # (subclasses such as MPQ's weight quantizer take no shift)
            self.set_params(params, peak)
        self.observing = False
        self.observer = None
        return params

    def calibrate_from(self, x: torch.Tensor) -> QuantParams:
        """Calibrate on one tensor (weights need no data)."""
        self.start_observing()
        self.observer.update(x)
        return self.calibrate()

    # --------------------------------------------------------------- forward
    def _zp(self):
        return 0 if self.spec.symmetric else self.zero_point

    def _peak(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """``max|x|`` (signed) or ``max x`` (unsigned), per tensor or per channel, detached; ``relu``: of
        ``relu(x)``, i.e. ``max(max x, 0)`` (the same value, without the ReLU's pass)."""
        x = x.detach()
        if self.axis is None:
            if relu or not self.signed:
                return x.amax().clamp_min(0) if relu else x.amax()
            lo, hi = torch.aminmax(x)  # one pass, no |x| tensor: max|x| = max(-min x, max x), exactly
            return torch.maximum(lo.neg(), hi)
        dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
        if relu:
            return x.amax(dim=dims).clamp_min(0)
        if not self.signed:
            return x.amax(dim=dims)
        return torch.maximum(x.amin(dim=dims).neg_(), x.amax(dim=dims))

    def _tracked_scale(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """Update and return the step for ``dynamic`` / ``ema`` (see the module docstring); ``relu``: the
        step of ``relu(x)``."""
        # every tensor here is detached (buffers, x.detach()), so no autograd bookkeeping is needed
        if self.spec.range_mode == "dynamic" or self.training:
            peak = self._peak(x, relu).float()
            if self.training:
                all_reduce_(peak, "max")  # data-parallel training: the global batch's peak (1 process of W B)
            if self.spec.range_mode == "ema":
                d = self.spec.ema_decay
                peak = self.running_max.mul_(d).add_(peak, alpha=1 - d)
            # s = clip_ratio * peak / Q; an all-zero peak gives the smallest normal step (every code 0)
            torch.mul(self.clip_ratio, peak, out=self.scale)
            self.scale.div_(self.spec.clip_levels(bool(self.signed))).clamp_min_(_TINY)
            if self.spec.pow2:
                _pow2_(self.scale)
        return self.scale

    def _one_call(self, relu: bool) -> bool:
        """Whether this quantizer's forward is one kernel call where the kernel covers the input (a QAT weight:
        ``dynamic``, signed, symmetric, per channel along axis 0, round to nearest, no power-of-two step, no
        window, no ReLU, one process): the step and the quantization of :func:`_tracked_scale` and
        :func:`fake_quantize_trusted` in one pass (:func:`~hwquant.numerics.fused_weight.fake_quantize_dynamic`)."""
        sp = self.spec
        return (self.axis == 0 and self.signed is True and sp.symmetric and sp.rounding == "nearest" and not relu
                and not sp.pow2 and not self.windowed and not distributed())

    def forward_with_bias(self, w: torch.Tensor, b: torch.Tensor, s_a: torch.Tensor, bqmin: int, bqmax: int):
        """``(forward(w), b quantized at fl32(s_a * scale))`` in one kernel call, what a quantized layer does with
        its weight and its bias in sequence (:meth:`~hwquant.nn.layers._QuantMixin.quantized_bias`), or
        ``None`` where the one-call path does not apply (then the caller does the two in sequence)."""
        if not (self.quantizing and self.input_gain == 1.0 and self.spec.range_mode == "dynamic"
                and self._one_call(False) and self._own_forward()):
            return None
        return self._one_call_forward(w, (b, s_a, bqmin, bqmax))

    def _own_forward(self) -> bool:
        """Whether :meth:`forward` is this class's (a subclass with its own, e.g. MPQ's weight quantizer, is
        never bypassed by the one-call paths)."""
        return type(self).forward is FakeQuantizer.forward

    def _one_call_forward(self, x: torch.Tensor, bias: tuple | None = None):
        """:func:`~hwquant.numerics.fused_weight.fake_quantize_dynamic` with this quantizer's state (``None``
        where the kernel does not cover ``x``); a newly installed scale is validated once, as in forward."""
        qmin, qmax = qrange(self.spec.bits, True, self.spec.narrow)
        out = fake_quantize_dynamic(x, self.clip_ratio, self.scale, self.spec.clip_levels(True), qmin, qmax,
                                    bias=bias)
        if out is not None:
            self._check_new_scale()
        return out

    def _trained_forward(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ / PACT: the step is (a function of) a parameter, so the scale gets a gradient."""
        signed = bool(self.signed)
        qmin, qmax = qrange(self.spec.bits, signed, self.spec.narrow)
        if self.spec.range_mode == "learned":
            n = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
            s = GradScale.apply(self.step.clamp_min(1e-8), 1.0 / math.sqrt(n * qmax))
            lsq = True
        else:
            s = self.alpha.clamp_min(1e-8) / self.spec.clip_levels(signed)
            lsq = False
        with torch.no_grad():
            self.scale.copy_(s.detach())
        s = shape_param(s.to(x.dtype), x, self.axis)
        return fake_quantize_trusted(x, s, None, qmin, qmax, self.spec.rounding, self.generator, self.axis, lsq=lsq)

    def relu_pair(self, x: torch.Tensor) -> torch.Tensor | None:
        """``relu(x)``, computed together with this quantizer's output for it in one pass (the fused
        ``hwquant.numerics.fused_relu`` kernel), for a ReLU whose output this quantizer and one other reader
        take (:class:`~hwquant.nn.relu.SharedReLU`); the next forward given that very tensor returns the
        quantized copy without another pass.  ``None`` (nothing done) where the kernel does not cover it: not
        quantizing, a gradient not wanted, per channel, a zero point, a window or a trained step."""
        sp = self.spec
        if not (self.quantizing and self.axis is None and sp.symmetric
                and not self.windowed and sp.range_mode in ("static", "dynamic", "ema") and sp.rounding == "nearest"
                and self.input_gain == 1.0 and torch.is_grad_enabled() and x.requires_grad
                and not torch.compiler.is_compiling() and self._own_forward()):
            return None
        if not fused_relu.covers(x):
            return None
        if sp.range_mode != "static":
            self._tracked_scale(x, relu=True)
        self._check_new_scale()
        qmin, qmax = qrange(sp.bits, bool(self.signed), sp.narrow)
        r, y = fused_relu.relu_fake_quantize_pair(x, float(self.scale), qmin, qmax)
        self._handoff = (weakref.ref(r), r._version, y)
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._handoff is not None:  # relu_pair already quantized this tensor (if nothing wrote into it since)
            ref, version, y = self._handoff
            self._handoff = None
            if ref() is x and x._version == version:
                return y
        if self.input_gain != 1.0:  # also when off: the layer's weights hold 1 / gain
            x = x * self.input_gain
        relu = self.applies_relu
        if relu and (self.windowed or self.spec.range_mode in ("learned", "pact")):
            x, relu = torch.relu(x), False  # a path without the fused pass: ReLU first, as its own op
        if self.observing:
            self.observer.update(x)
        if not (self.enabled and self.calibrated):
            return x
        mode = self.spec.range_mode
        if mode in ("learned", "pact"):
            return self._trained_forward(x)
        if mode == "dynamic" and self._one_call(relu):
            y = self._one_call_forward(x)
            if y is not None:
                return y
        if mode != "static":
            self._tracked_scale(x, relu)
        self._check_new_scale()
        signed = bool(self.signed)
        if self.windowed:
            d8 = shape_param(self.base_step().to(x.dtype), x, self.axis)
            return window_fake_quantize(x, d8, int(self.window_shift), self.spec.bits, self.spec.q_step_bits, signed)
        qmin, qmax = qrange(self.spec.bits, signed, self.spec.narrow)
        s = shape_param(self.scale.to(x.dtype), x, self.axis)
        z = None if self.spec.symmetric else shape_param(self.zero_point.to(x.dtype), x, self.axis)
        return fake_quantize_trusted(x, s, z, qmin, qmax, self.spec.rounding, self.generator, self.axis, relu=relu)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` with the current parameters (for export and tests)."""
        if self.input_gain != 1.0:
            x = x * self.input_gain
        if self.relu_input:
            x = torch.relu(x)
        if self.windowed:
            d8 = shape_param(self.base_step().to(x.dtype), x, self.axis)
            c = window_codes(x, d8, int(self.window_shift), self.spec.bits, self.spec.q_step_bits, bool(self.signed))
            return c.to(code_dtype(*qrange(self.spec.bits, bool(self.signed))))
        return quantize(
            x,
            self.scale,
            self.spec.bits,
            bool(self.signed),
            self.spec.rounding,
            zero_point=self._zp(),
            axis=self.axis,
            narrow=self.spec.narrow,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        s = self.spec
        sign = {True: "signed", False: "unsigned", None: "auto-sign"}[self.signed]
        step = "" if s.step_bits in (None, s.bits) else f", step_bits={s.step_bits} (clip_at={s.clip_at})"
        if self.windowed:
            step += f", window_shift={int(self.window_shift)}"
        mode = "" if s.range_mode == "static" else f", range_mode={s.range_mode}"
        p2 = ", pow2" if s.pow2 else ""
        p2 += f", input_gain={self.input_gain:.9g}" if self.input_gain != 1.0 else ""
        p2 += ", relu_input" if self.relu_input else ""
        return (f"bits={s.bits}, {sign}, {s.granularity}, rounding={s.rounding}{step}{mode}{p2}, "
                f"enabled={self.enabled}")

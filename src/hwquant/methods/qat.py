"""Quantization-aware training: CQAT (clipped QAT, Lee & Park, ISOCC 2022; seed ``001``) and the QAT
baselines (min-max STE, PACT, LSQ), all on one mechanism: a :class:`~hwquant.nn.FakeQuantizer` whose
``range_mode`` says how its step follows training.

``qmodel = prepare_qat(model, config, calib_loader)`` folds BatchNorm into the convolutions (the model that is
trained is the model that is deployed: integer weights of the folded convs), swaps every conv/linear for its
fake-quantized twin, and initialises every quantizer from the float model on the calibration batches.  Then
train ``qmodel`` like any model (:func:`hwquant.train.fit`).  Gradients pass rounding by the straight-through
estimator, zero where the code is clipped.

**CQAT** [paper]: values are quantized with an 8-bit step and the 8-bit codes are then clipped so that only
4 bits (activations) / 5 bits (weights) are used.  Here [rec]:

* activations after ReLU (unsigned): ``q = clamp(round(x / s_a), 0, 2^a_bits - 1)``; weights (signed, per
  output channel or per tensor): ``q = clamp(round(W / s_w), -2^(w_bits-1), 2^(w_bits-1) - 1)``;
  the first conv and the last FC stay at ``first_last_bits`` (8) with plain min-max steps, unclipped (the
  same for every method);
* ``step="max"`` is the literal reading: ``s = peak / (2^8 - 1)`` (activations, unsigned) and
  ``s = max|W| / (2^7 - 1)`` (weights), so the clipped codes cover only ``15/255`` of the activation range and
  ``16/127`` of the weight range;
* ``step="mse"`` calibrates the step on the FP32 model so that the *clipped* codes minimise the mean squared
  error (the clip is chosen for the stored codes, not the 8-bit range); the 8-bit grid with that step is
  what an 8-bit datapath runs, and the 4/5-bit codes are its low bits;
* ``step="window"`` is the hardware reading of "quantize to 8 bits, then keep 4/5 bits": one 8-bit min-max
  quantizer (``d8 = peak / Q(8)``, following the peak in training as above) and a shifter,
  ``q = sat_bits(rne(q8 / 2^s))`` with ``q8 = sat_8(rne(x / d8))``, the shift ``s in 0..8 - bits`` chosen per
  layer by MSE at calibration and kept (:mod:`hwquant.numerics.window`, the ``window`` observer); the
  effective step is ``2^s * d8``, and the integer model and the ONNX graph requantize in the same two stages;
* during training the weight step follows the weights (``dynamic``: ``s = r * max|W| / Q`` every step with the
  ratio ``r`` fixed at calibration), the activation step follows an EMA of the batch peak (``act_range="ema"``)
  or stays at its calibrated value (``"static"``).

Baselines at the same bits on the same mechanism: :class:`STEConfig` (min-max: ``s = max|W| / q_max``
every step, activations ``s = EMA(max x) / q_max``), :class:`PACTConfig` (activations: a trained clip
``alpha``, initialised from the MSE clip; weights as STE), :class:`LSQConfig` (weights and activations: a
trained step with the LSQ gradient, initialised from the MSE step).

Integer codes of a prepared model are real: ``layer.weight_quant.codes(layer.weight)`` are int8 in
``[-16, 15]`` for W5 and ``layer.input_quant.codes(x)`` uint8 in ``[0, 15]`` for A4.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..nn.fold import fold_batchnorm
from ..nn.relu import absorb_relus
from ..nn.swap import CALIB_WEIGHTS, LayerQuant, QuantRecipe, calibrate, quant_layers, quantize_model
from ..numerics.codes import check_bits, qrange
from ..spec import QuantSpec

ACT_RANGES = ("ema", "static")
CQAT_STEPS = ("max", "mse", "window")


QAT_CONFIGS: dict[str, type] = {}  # method name -> config class (``hwquant qat --method``, checkpoint rebuild)


def register_qat(name: str):
    """Class decorator: register a QAT config under ``name`` in :data:`QAT_CONFIGS` (as observers register)."""
    def deco(cls):
        QAT_CONFIGS[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class QATConfigBase(abc.ABC):
    """Fields every QAT method shares.

    Attributes:
        w_bits, a_bits: stored weight / activation code widths (2..16).
        first_last_bits: width of the first conv and last linear layer (weights and inputs), ``None``: same as
            the others.
        per_channel: one weight step per output channel (else per tensor).
        ema_decay: ``d`` of the activation-peak EMA ``m <- d m + (1 - d) peak``.
        fold_bn: fold BatchNorm into the convs before QAT (what the integer datapath runs).
        calib_batches: calibration batches used to initialise the quantizers (``None``: all).
        pow2: power-of-two steps everywhere (fixed point; requantization is a shift, so the integer model
            of :func:`hwquant.export.integer_model` is bit-exact with the trained model).  Not for LSQ / PACT.
        calib_weights: what the activation steps are calibrated with: ``"quantized"`` weights (the
            calibrated weight quantizers on) or ``"float"`` weights (see :func:`hwquant.nn.swap.calibrate`).
        absorb_relu: the input quantizers apply the ReLUs that only feed them, and a ReLU that also feeds one
            other reader (a residual add) is fused with the quantizer, so a training step makes fewer passes
            over those activations (:func:`hwquant.nn.absorb_relus`; the same values and gradients bit for bit,
            only faster).
    """

    w_bits: int = 5
    a_bits: int = 4
    first_last_bits: int | None = 8
    per_channel: bool = True
    ema_decay: float = 0.9
    fold_bn: bool = True
    calib_batches: int | None = 8
    pow2: bool = False
    calib_weights: str = "quantized"
    absorb_relu: bool = True

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        d = self.ema_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ConfigError(f"ema_decay must be a number in [0, 1), got {d!r}")
        if self.calib_batches is not None and (not isinstance(self.calib_batches, int) or self.calib_batches < 1):
            raise ConfigError(f"calib_batches must be a positive integer or null, got {self.calib_batches!r}")
        for flag in ("pow2", "absorb_relu"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.calib_weights not in CALIB_WEIGHTS:
            raise ConfigError(f"calib_weights must be one of {', '.join(CALIB_WEIGHTS)}, got {self.calib_weights!r}")
        if self.pow2:
            self.recipe()  # the specs reject pow2 for trained steps (LSQ, PACT)

    @abc.abstractmethod
    def _specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        """The weight and input-activation specs of the low-bit layers (each method's own)."""

    def _minmax_specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        """Plain min-max QAT: ``s = max|W| / q_max`` every step, activations ``s = EMA(peak) / q_max``."""
        w = QuantSpec(bits=wb, signed=True, granularity=self._gran(), range_mode="dynamic")
        a = QuantSpec(bits=ab, signed=None, range_mode="ema", ema_decay=self.ema_decay)
        return w, a

    def recipe(self) -> QuantRecipe:
        """Low-bit layers get the method's specs; the first conv and last FC (``first_last_bits``) get plain
        min-max quantization for every method, so methods differ only where they are meant to."""
        w, a = self._pow2(*self._specs(self.w_bits, self.a_bits))
        overrides = ()
        if self.first_last_bits is not None:
            fw, fa = self._pow2(*self._minmax_specs(self.first_last_bits, self.first_last_bits))
            fl = LayerQuant(weight=fw, act=fa)
            overrides = (("<first>", fl), ("<last>", fl))
        return QuantRecipe(default=LayerQuant(weight=w, act=a), overrides=overrides)

    def finish(self, qmodel: nn.Module) -> nn.Module:
        """Last step of building the QAT model, after the layer swap (a method may replace quantizers)."""
        return qmodel

    def _pow2(self, w: QuantSpec, a: QuantSpec) -> tuple[QuantSpec, QuantSpec]:
        return (w.with_(pow2=True), a.with_(pow2=True)) if self.pow2 else (w, a)

    def _gran(self) -> str:
        return "channel" if self.per_channel else "tensor"


@register_qat("cqat")
@dataclass(frozen=True)
class CQATConfig(QATConfigBase):
    """CQAT: an 8-bit (``base_bits``) step, codes clipped to ``w_bits`` / ``a_bits`` (see the module docstring).

    Attributes:
        base_bits: width the step is sized for (8), ``>= w_bits, a_bits``.
        step: ``"mse"`` (clip calibrated for the clipped codes), ``"max"`` (literal ``peak / Q(base_bits)``) or
            ``"window"`` (the ``base_bits`` min-max code shifted right by a per-layer shift, saturated).
        act_range: ``"ema"`` (the activation step follows an EMA of the batch peak) or ``"static"``.
        pow2_step: with ``pow2``: ``"round"`` (the MSE step rounded to the nearest power of two in the log
            domain) or ``"search"`` (the MSE-best power of two).  ``search`` starts better (ResNet-20 W5A4
            83.97 % instead of 80.12 %; MobileNetV2 83.1 % instead of 46.1 %) but does not end better:
            ResNet-20 after 150 steps 91.56 +- 0.02 % against 91.72 +- 0.07 % (two seeds each,
            ``benchmarks/results/pow2_step.md``), MobileNetV2 0.45 pt lower after one and two epochs and
            0.16 pt higher after four (one seed, ``benchmarks/results/mobilenet.md``), so ``round`` stays the
            default.
    """

    base_bits: int = 8
    step: str = "mse"
    act_range: str = "ema"
    pow2_step: str = "round"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.base_bits, "base_bits")
        if self.base_bits < max(self.w_bits, self.a_bits):
            raise ConfigError(f"base_bits must be >= w_bits and a_bits, got {self.base_bits}")
        if self.step not in CQAT_STEPS:
            raise ConfigError(f"step must be one of {', '.join(CQAT_STEPS)}, got {self.step!r}")
        if self.act_range not in ACT_RANGES:
            raise ConfigError(f"act_range must be one of {', '.join(ACT_RANGES)}, got {self.act_range!r}")
        if self.pow2_step not in ("round", "search"):
            raise ConfigError(f"pow2_step must be round or search, got {self.pow2_step!r}")

    def _specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        if self.step == "window":
            w = QuantSpec(bits=wb, signed=True, granularity=self._gran(), observer="window",
                          step_bits=self.base_bits, clip_at="window", range_mode="dynamic")
            a = QuantSpec(bits=ab, signed=None, observer="window", step_bits=self.base_bits, clip_at="window",
                          range_mode=self.act_range, ema_decay=self.ema_decay)
            return w, a
        literal = self.step == "max"
        obs = "minmax" if literal else "mse"
        clip_at = "step" if literal else "codes"
        args = {} if literal else {"pow2_search": self.pow2_step == "search"}
        w = QuantSpec(bits=wb, signed=True, granularity=self._gran(), observer=obs, step_bits=self.base_bits,
                      clip_at=clip_at, range_mode="dynamic", observer_args=args)
        a = QuantSpec(bits=ab, signed=None, observer=obs, step_bits=self.base_bits, clip_at=clip_at,
                      range_mode=self.act_range, ema_decay=self.ema_decay, observer_args=args)
        return w, a


@register_qat("ste")
@dataclass(frozen=True)
class STEConfig(QATConfigBase):
    """Plain min-max QAT with the straight-through estimator: ``s = max|W| / q_max`` every step, activations
    ``s = EMA(peak) / q_max``."""

    w_bits: int = 4
    a_bits: int = 4

    def _specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        return self._minmax_specs(wb, ab)


@register_qat("pact")
@dataclass(frozen=True)
class PACTConfig(QATConfigBase):
    """PACT (Choi et al. 2018): activations with a trained clip ``alpha`` (initialised from the MSE clip on
    the calibration data), ``s = alpha / q_max``; weights min-max as :class:`STEConfig`."""

    w_bits: int = 4
    a_bits: int = 4

    def _specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        w, _ = self._minmax_specs(wb, ab)
        return w, QuantSpec(bits=ab, signed=None, observer="mse", range_mode="pact")


@register_qat("lsq")
@dataclass(frozen=True)
class LSQConfig(QATConfigBase):
    """LSQ (Esser et al. 2020): weights and activations with a trained step (LSQ gradient scaled by
    ``1 / sqrt(n q_max)``), initialised from the MSE-optimal step on the calibration data."""

    w_bits: int = 4
    a_bits: int = 4

    def _specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        w = QuantSpec(bits=wb, signed=True, granularity=self._gran(), observer="mse", range_mode="learned")
        a = QuantSpec(bits=ab, signed=None, observer="mse", range_mode="learned")
        return w, a




def build_qat_model(model: nn.Module, config: QATConfigBase) -> nn.Module:
    """The QAT module structure for ``config`` (BN folded, layers swapped), quantizers not initialised.

    Loading a QAT checkpoint's state dict into it restores the trained model.
    """
    if not isinstance(config, QATConfigBase):
        names = ", ".join(c.__name__ for c in QAT_CONFIGS.values())
        raise ConfigError(f"prepare_qat needs a QAT config ({names}), got {type(config).__name__}")
    base = fold_batchnorm(model) if config.fold_bn else model
    qmodel = config.finish(quantize_model(base, config.recipe()))
    if config.absorb_relu:
        absorb_relus(qmodel)
    return qmodel


def prepare_qat(
    model: nn.Module, config: QATConfigBase, calib_loader: Iterable | None = None, *, progress: bool = False
) -> nn.Module:
    """A fake-quantized copy of ``model`` ready to train (see the module docstring).

    The quantizers are initialised from ``calib_loader`` (batches of ``x`` or ``(x, y)``, at most
    ``config.calib_batches``) or, when it is ``None``, from the first batch the model sees.  ``model`` is
    not modified.
    """
    was_training = model.training
    qmodel = build_qat_model(model, config)
    if calib_loader is not None:
        calibrate(qmodel, calib_loader, max_batches=config.calib_batches, progress=progress,
                  weights=config.calib_weights)
    else:
        _calibrate_on_first_batch(qmodel, config.calib_weights)
    qmodel.train(was_training)
    return qmodel


def _calibrate_on_first_batch(qmodel: nn.Module, weights: str = "quantized") -> None:
    holder: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        holder["handle"].remove()
        calibrate(module, [args[0]], weights=weights)

    holder["handle"] = qmodel.register_forward_pre_hook(hook)


def qat_summary(qmodel: nn.Module) -> list[dict[str, Any]]:
    """Per layer: code widths, the step each quantizer uses now, the step's ``base_bits`` range, clip ratio."""
    rows = []
    for name, layer in quant_layers(qmodel):
        row: dict[str, Any] = {"layer": name}
        for tag, q in (("w", layer.weight_quant), ("a", layer.input_quant)):
            if q is None or not q.calibrated:
                continue
            spec = q.spec
            row[f"{tag}_bits"] = spec.bits
            row[f"{tag}_mode"] = spec.range_mode
            row[f"{tag}_scale"] = float(q.scale.max()) if q.scale.dim() else float(q.scale)
            if spec.q_step_bits != spec.bits:
                # the range the step spans with all step_bits codes (what an 8-bit datapath sees)
                row[f"{tag}_step_range"] = row[f"{tag}_scale"] * qrange(spec.q_step_bits, bool(q.signed))[1]
            ratio = getattr(q, "clip_ratio", None)
            if ratio is not None and ratio.numel():
                row[f"{tag}_clip_ratio"] = float(ratio.mean())
        rows.append(row)
    return rows


__all__ = [
    "CQATConfig",
    "LSQConfig",
    "PACTConfig",
    "QAT_CONFIGS",
    "STEConfig",
    "register_qat",
    "build_qat_model",
    "prepare_qat",
    "qat_summary",
]


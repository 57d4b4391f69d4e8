"""Observer-based post-training quantization: min-max and the calibration baselines (percentile, MSE,
KL/entropy, ACIQ) that every other PTQ method is compared with.

Pipeline (:func:`observer_ptq`):

1. fold BatchNorm into the preceding convs (hardware has no BN);
2. swap conv/linear layers for fake-quantized ones: weights signed, symmetric, per output channel (or per
   tensor), scale ``max|W| / (2^(b-1) - 1)``; input activations per tensor, unsigned when the calibration
   data is non-negative (after ReLU) with scale ``max x / (2^b - 1)``, else signed with
   ``max|x| / (2^(b-1) - 1)``; biases int32 at ``s_a * s_w``;
3. stream the calibration batches through the float model to record activation ranges;
4. report per-layer weight SQNR and the end-to-end SQNR of the logits on the calibration data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.bias import correct_bias
from ..nn.fold import fold_batchnorm
from ..nn.swap import LayerQuant, QuantRecipe, calibrate, quant_layers, quantize_model, set_quant_enabled
from ..numerics.codes import check_bits
from ..numerics.metrics import sqnr_db
from ..numerics.rounding import ROUNDING_MODES
from ..spec import QuantSpec
from .base import register_ptq


@dataclass(frozen=True)
class ObserverPTQConfig:
    """PTQ whose activation ranges come from a calibration observer (min-max by default).

    Attributes:
        observer: activation observer: ``minmax``, ``percentile``, ``mse``, ``kl``, ``aciq``, ``ggd``...
        w_observer: weight observer (``minmax``: scale ``max|W| / (2^(b-1)-1)``).
        observer_args: extra observer options, e.g. ``{"percentile": 99.99}`` or ``{"dist": "laplace"}``.
        w_bits, a_bits: weight / activation code widths (2..16).
        per_channel: per-output-channel weight scales (else per tensor).
        fold_bn: fold BatchNorm into convs before quantizing.
        first_last_bits: width for the first conv and last linear layer (weights and inputs); ``None``
            uses ``w_bits`` / ``a_bits`` like every other layer.
        rounding: rounding mode of the quantizers.
        calib_batches: use at most this many calibration batches (``None``: all).
        bias_correction: after calibration, subtract each layer's mean output shift from its bias
            (:func:`hwquant.nn.correct_bias`; off by default, as in the published baselines).
    """

    observer: str = "minmax"
    w_observer: str = "minmax"
    observer_args: tuple[tuple[str, Any], ...] = ()
    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = True
    fold_bn: bool = True
    first_last_bits: int | None = None
    rounding: str = "nearest"
    calib_batches: int | None = None
    bias_correction: bool = False

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.rounding not in ROUNDING_MODES:
            raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {self.rounding!r}")
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"bias_correction must be true or false, got {self.bias_correction!r}")
        if self.calib_batches is not None and (not isinstance(self.calib_batches, int) or self.calib_batches < 1):
            raise ConfigError(f"calib_batches must be a positive integer or null, got {self.calib_batches!r}")
        args = self.observer_args.items() if isinstance(self.observer_args, dict) else self.observer_args
        object.__setattr__(self, "observer_args", tuple(sorted((str(k), v) for k, v in args)))
        from ..observers import OBSERVERS

        for name in ("observer", "w_observer"):
            if getattr(self, name) not in OBSERVERS:
                raise ConfigError(f"{name} must be one of {', '.join(sorted(OBSERVERS))}, got {getattr(self, name)!r}")

    def recipe(self) -> QuantRecipe:
        gran = "channel" if self.per_channel else "tensor"

        def layer(wb: int, ab: int) -> LayerQuant:
            return LayerQuant(
                weight=QuantSpec(bits=wb, signed=True, granularity=gran, rounding=self.rounding,
                                 observer=self.w_observer),
                act=QuantSpec(bits=ab, signed=None, granularity="tensor", rounding=self.rounding,
                              observer=self.observer, observer_args=self.observer_args),
            )

        overrides = ()
        if self.first_last_bits is not None:
            fl = layer(self.first_last_bits, self.first_last_bits)
            overrides = (("<first>", fl), ("<last>", fl))
        return QuantRecipe(default=layer(self.w_bits, self.a_bits), overrides=overrides)


MinMaxPTQConfig = ObserverPTQConfig  # the default observer is min-max


def layer_table(qmodel: nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer: bits, sign, scales and the SQNR of its quantized weights."""
    rows = []
    for name, layer in quant_layers(qmodel):
        row: dict[str, Any] = {"layer": name, "type": type(layer).__name__}
        wq, aq = layer.weight_quant, layer.input_quant
        if wq is not None and wq.calibrated:
            with torch.no_grad():
                row["w_bits"] = wq.spec.bits
                row["w_scale_max"] = float(wq.scale.max())
                row["w_sqnr_db"] = sqnr_db(layer.weight, wq(layer.weight))
        if aq is not None and aq.calibrated:
            row["a_bits"] = aq.spec.bits
            row["a_signed"] = bool(aq.signed)
            row["a_scale"] = float(aq.scale.reshape(-1)[0])
            row.update({k: v for k, v in aq.calib_info.items() if k != "observer"})
        rows.append(row)
    return rows


@torch.no_grad()
def end_to_end_sqnr(float_model: nn.Module, qmodel: nn.Module, batches: Iterable, max_batches: int | None) -> float:
    """SQNR (dB) of the quantized model's logits against the float model's, over ``batches``."""
    float_model.eval()
    qmodel.eval()
    sig = noise = 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        ref = float_model(x).double()
        out = qmodel(x).double()
        sig += float(ref.pow(2).sum())
        noise += float((ref - out).pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(sig / noise)).item()


def observer_ptq(
    model: nn.Module,
    recipe: QuantRecipe,
    calib_loader: Iterable,
    *,
    fold_bn: bool = True,
    calib_batches: int | None = None,
    progress: bool = False,
    bias_correction: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fold BN, swap layers per ``recipe``, calibrate with the recipe's observers (then correct the biases with
    ``bias_correction``), and report."""
    float_model = fold_batchnorm(model) if fold_bn else _copy_eval(model)
    float_model.eval()
    qmodel = quantize_model(float_model, recipe)
    n = calibrate(qmodel, calib_loader, max_batches=calib_batches, progress=progress)
    set_quant_enabled(qmodel, True)
    corrected = correct_bias(qmodel, float_model, calib_loader, max_batches=calib_batches) if bias_correction else None
    report = {
        "calib_batches": n,
        "bias_correction": corrected,
        "layers": layer_table(qmodel),
        "sqnr_db": end_to_end_sqnr(float_model, qmodel, calib_loader, calib_batches),
    }
    return qmodel, report


def _copy_eval(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


@register_ptq(ObserverPTQConfig)
def minmax_ptq(model: nn.Module, config: ObserverPTQConfig, calib_loader: Iterable, *, progress: bool = False):
    """Observer-based PTQ (see the module docstring)."""
    qmodel, report = observer_ptq(
        model, config.recipe(), calib_loader, fold_bn=config.fold_bn,
        calib_batches=config.calib_batches, progress=progress, bias_correction=config.bias_correction,
    )
    report = {"method": config.observer, "config": asdict(config), **report}
    return qmodel, report

"""GGD PTQ: fixed-point weights with error-minimising fractional length, activation steps from a fitted
generalized gamma distribution, backward-forward tuning (Kim et al., Samsung; seed ``002``).

Pipeline (``ptq(model, GGDPTQConfig(...), calib_loader)``):

1. **Fold BatchNorm** into the preceding convolutions (hardware has no BN).
2. **Weights** [paper]: Qm.n two's complement per layer (per tensor; per channel optional).  The fractional
   length FL is the one minimising the MSE of the saturating quantizer over the tensor's values
   [rec: search ``b - 1 - ceil(log2 max|w|) +- fl_radius``]; step ``2^-FL``.
3. **Activations** [paper]: fit a generalized gamma density ``f(x) ∝ |x|^β exp(-λ|x|^α)`` to each layer's
   input (one-sided after ReLU with the zeros as a point mass, else two-sided) on the calibration data, and
   take the step that minimises the expected quantization MSE of that density [rec: Hui-Neuhoff asymptotic
   step refined numerically].  With ``power_of_two`` [rec, the fixed-point hardware case] the step is
   rounded to ``2^-FL_a`` (down or up, whichever has lower error on the calibration samples).
   **Image input** [rec, ``image_gain``, on by default with ``power_of_two``]: the layers that read the model
   input take the GGD step ``s`` unrounded, and :func:`~hwquant.nn.fold.fold_input_gain` turns it into the power
   of two ``p`` nearest to it with an input gain ``g = p / s`` that the host applies to the normalised image (a
   change of the normalisation's constants) and weights ``W / g``: the datapath stays fixed point, and the
   image keeps the step its atoms were placed for.  Measured (ResNet-20 / Fashion-MNIST, W8A4 every layer,
   no BFT): a power-of-two image step puts the background atom (-0.81, half of the pixels) at -3.24 steps
   instead of -3.01 and costs 24.7 pt (65.99 % vs 90.65 % with every step free); freeing the image step alone
   gives 90.58 %, freeing any other single layer 64.96-79.55 %.
4. **Bias correction** [rec, ``bias_correction``, off by default: not the paper's]: each layer's mean output
   shift (quantized vs float, on the calibration images) is subtracted from its bias
   (:func:`hwquant.nn.correct_bias`), layer by layer in the order they run.  It removes the systematic error
   of atoms rounded against a coarse grid (a channel's background value after the image layer), which plain
   GGD with 4-bit activations is very sensitive to (``benchmarks/results/ptq.md``).
5. **Biases** [rec]: ``bias="accumulator"`` stores the bias at the accumulator's scale
   ``2^-(FL_w + FL_a)`` in ``accumulator_bits`` (32) bits, what an integer MAC array adds; ``bias="own"``
   gives it its own error-minimising FL in ``bias_bits`` bits (capped at ``FL_w + FL_a``).
6. **Backward-forward tuning** (:mod:`hwquant.methods.bft`) [paper: adjust FLs per layer to maximise
   top-1/top-5; rec: sweep layers last to first, then first to last; at each layer try ``FL-1, FL, FL+1`` for
   the weights, then for the input activations, and keep the candidate with the best score on the first
   ``bft_samples`` calibration images].
   The score (``bft_criterion``) is smooth by default [rec]: ``"kl"``, the mean KL divergence
   ``KL(softmax(z_float) || softmax(z_quant))`` per image (lower is better; ties to the higher logit SQNR);
   ``"logit_sqnr"``; or the paper's ``"top1"`` ``(top-1, top-5, logit SQNR)``, which on a few hundred images
   moves in steps of one image and over-fits them (measured: W8A4 first/last 8-bit, BFT raised calibration
   top-1 and lowered test top-1 91.73 -> 91.20 %).  A change is kept only if it also does not worsen the same
   criterion on ``bft_holdout`` further calibration images that BFT never scores by (what is left of the
   split if it is smaller; none left: no check).

The report holds per-layer FL / step, the fitted GGD parameters, weight and layer-output SQNR, end-to-end
logit SQNR, and calibration accuracy before and after BFT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..device import supports_channels_last
from ..errors import ConfigError
from ..nn.bias import correct_bias
from ..nn.fold import fold_batchnorm, fold_input_gain
from ..nn.graph import layer_positions
from ..nn.quantizer import FakeQuantizer
from ..nn.swap import LayerQuant, QuantRecipe, calibrate, quant_layers, quantize_model
from ..numerics.codes import check_bits
from ..numerics.fixed_point import best_fraction_length
from ..numerics.metrics import sqnr_db
from ..spec import QuantParams, QuantSpec
from .base import register_ptq
from .bft import BFT_CRITERIA, CalibScorer, backward_forward_tuning

BIAS_MODES = ("accumulator", "own")


@dataclass(frozen=True)
class GGDPTQConfig:
    """GGD PTQ (see the module docstring).

    Attributes:
        w_bits, a_bits: weight / activation word lengths (2..16).
        per_channel: one FL per output channel instead of per layer (the paper uses per layer).
        fl_radius: FL search radius around ``b - 1 - ceil(log2 max|w|)``.
        power_of_two: activation steps rounded to powers of two (fixed point); else the exact GGD step.
        image_gain: with ``power_of_two``, the layers reading the model input keep their exact GGD step as a
            power of two times a host-side input gain (see the module docstring); ``False``: rounded like the
            others.
        bias: ``"accumulator"`` (bias at ``2^-(FL_w+FL_a)``, ``accumulator_bits`` wide) or ``"own"``.
        bias_bits: word length of an ``"own"`` bias (2..16).
        accumulator_bits: word length of the accumulator-scale bias (8..32).
        first_last_bits: word length for the first and last layers (``None``: same as the others).
        bft: run backward-forward tuning.
        bft_samples: calibration images used to score BFT candidates (the first ones of the split;
            ``None``: all).  Each of the ~``8 x layers`` candidates costs one forward pass over them.
        bft_criterion: ``"kl"`` (default), ``"logit_sqnr"`` or ``"top1"`` (see the module docstring).
        bft_holdout: further calibration images a kept change must not worsen (``0``: no check).
        calib_batches: calibration batches used to fit the GGDs (``None``: all).
        bias_correction: after calibration (and the input gain's fold), subtract each layer's mean output
            shift from its bias (:func:`hwquant.nn.correct_bias`; not part of the paper's method, off by
            default).  BFT then tunes the corrected model.
        max_samples: activation values kept per layer for the GGD fit (a seeded reservoir).
        seed: seed of the reservoir sampling.
    """

    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = False
    fl_radius: int = 3
    power_of_two: bool = True
    image_gain: bool = True
    bias: str = "accumulator"
    bias_bits: int = 16
    accumulator_bits: int = 32
    first_last_bits: int | None = None
    bft: bool = True
    bft_samples: int | None = 512
    bft_criterion: str = "kl"
    bft_holdout: int = 256
    calib_batches: int | None = None
    bias_correction: bool = False
    max_samples: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.bias_bits, "bias_bits")
        check_bits(self.accumulator_bits, "accumulator_bits", lo=8, hi=32)
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not isinstance(self.fl_radius, int) or not 1 <= self.fl_radius <= 16:
            raise ConfigError(f"fl_radius must be an integer in 1..16, got {self.fl_radius!r}")
        for name in ("bft_samples", "calib_batches"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or null, got {v!r}")
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"bias_correction must be true or false, got {self.bias_correction!r}")
        if self.bft_criterion not in BFT_CRITERIA:
            raise ConfigError(f"bft_criterion must be one of {', '.join(BFT_CRITERIA)}, got {self.bft_criterion!r}")
        if isinstance(self.bft_holdout, bool) or not isinstance(self.bft_holdout, int) or self.bft_holdout < 0:
            raise ConfigError(f"bft_holdout must be an integer >= 0, got {self.bft_holdout!r}")
        if self.bft_holdout and self.bft_samples is None:
            raise ConfigError("bft_holdout needs bft_samples (the images before the held-out ones); set "
                              "bft_holdout to 0 to score on the whole split")
        if not isinstance(self.max_samples, int) or self.max_samples < 1000:
            raise ConfigError(f"max_samples must be an integer >= 1000, got {self.max_samples!r}")

    def recipe(self) -> QuantRecipe:
        gran = "channel" if self.per_channel else "tensor"

        def layer(wb: int, ab: int, pow2: bool = self.power_of_two) -> LayerQuant:
            return LayerQuant(
                weight=QuantSpec(bits=wb, signed=True, granularity=gran, observer="fixedpoint",
                                 observer_args={"radius": self.fl_radius}),
                act=QuantSpec(bits=ab, signed=None, granularity="tensor", observer="ggd",
                              observer_args={"power_of_two": pow2, "seed": self.seed,
                                             "max_samples": self.max_samples}),
                bias_bits=self.accumulator_bits,
            )

        overrides: list[tuple[str, LayerQuant]] = []
        fb = self.first_last_bits
        if fb is not None:
            overrides = [("<first>", layer(fb, fb)), ("<last>", layer(fb, fb))]
        if self.folds_image_gain:  # the exact step, made a power of two by fold_input_gain after calibration
            # (last, so it wins where one layer is both first and last)
            overrides.append(("<first>", layer(fb or self.w_bits, fb or self.a_bits, pow2=False)))
        return QuantRecipe(default=layer(self.w_bits, self.a_bits), overrides=tuple(overrides))

    @property
    def folds_image_gain(self) -> bool:
        return self.power_of_two and self.image_gain


def fraction_length(q: FakeQuantizer) -> list[int] | int:
    """FL of a power-of-two quantizer (``scale = 2^-FL``); a list for per-channel scales."""
    fl = (-torch.log2(q.scale)).round().to(torch.int64)
    return fl.tolist() if fl.dim() else int(fl)


def _is_pow2(q: FakeQuantizer) -> bool:
    return bool(torch.all(torch.log2(q.scale) == torch.round(torch.log2(q.scale))))


# ----------------------------------------------------------------------------- report
@torch.no_grad()
def layer_sqnr(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """SQNR (dB) of every quantized layer's output in ``qmodel`` against the same layer in ``float_model``
    on input ``x`` (noise accumulated from all layers up to and including it)."""
    outs: dict[str, dict[str, torch.Tensor]] = {"f": {}, "q": {}}
    names = [n for n, _ in quant_layers(qmodel)]
    hooks = []
    for tag, model in (("f", float_model), ("q", qmodel)):
        mods = dict(model.named_modules())
        for n in names:
            hooks.append(mods[n].register_forward_hook(
                lambda m, i, o, n=n, tag=tag: outs[tag].__setitem__(n, o.detach())))
    float_model(x)
    qmodel(x)
    for h in hooks:
        h.remove()
    return {n: sqnr_db(outs["f"][n], outs["q"][n]) for n in names}


def set_own_bias(qmodel: nn.Module, bits: int, radius: int, placeholder: bool = False) -> None:
    """Give every biased layer its own fixed-point bias quantizer (FL by error minimisation).

    ``placeholder=True`` only builds the modules (to load a checkpoint's state dict into them).
    """
    for _, layer in quant_layers(qmodel):
        if layer.bias is None or layer.weight_quant is None or layer.input_quant is None:
            continue
        bq = FakeQuantizer(QuantSpec(bits=bits, signed=True)).to(layer.weight.device)
        if not placeholder:
            fl = best_fraction_length(layer.bias.detach(), bits, signed=True, radius=radius)
            bq.set_params(QuantParams(scale=torch.tensor(2.0**-fl), zero_point=torch.tensor(0, dtype=torch.int32),
                                      bits=bits, signed=True))
        layer.bias_quant = bq


def ggd_layer_table(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    out_sqnr = layer_sqnr(float_model, qmodel, x)
    rows = []
    for name, layer in quant_layers(qmodel):
        wq, aq = layer.weight_quant, layer.input_quant
        row: dict[str, Any] = {"layer": name, "channels": int(layer.weight.shape[0])}
        if wq is not None and wq.calibrated:
            row["w_bits"] = wq.spec.bits
            row["w_fl"] = fraction_length(wq) if _is_pow2(wq) else None
            with torch.no_grad():
                w_hat = wq(layer.weight)
                row["w_sqnr_db"] = sqnr_db(layer.weight, w_hat)
                nonzero = layer.weight.reshape(layer.weight.shape[0], -1).abs().amax(dim=1) > 0
                lost = (w_hat.reshape(w_hat.shape[0], -1) == 0).all(dim=1) & nonzero
                row["w_zero_channels"] = int(lost.sum())
        if aq is not None and aq.calibrated:
            row["a_bits"] = aq.spec.bits
            row["a_signed"] = bool(aq.signed)
            row["a_step"] = float(aq.scale)
            if aq.input_gain != 1.0:
                row["a_input_gain"] = aq.input_gain
            row["a_fl"] = fraction_length(aq) if _is_pow2(aq) else None
            for k in ("alpha", "beta", "lam", "zero_mass"):
                if k in aq.calib_info:
                    row[f"ggd_{k}"] = aq.calib_info[k]
        if layer.bias is not None:
            s = layer.bias_scale()
            row["bias_fl"] = int(round(-math.log2(float(s.max())))) if s is not None and _is_pow2_t(s) else None
        row["out_sqnr_db"] = out_sqnr[name]
        rows.append(row)
    return rows


def _is_pow2_t(s: torch.Tensor) -> bool:
    return bool(torch.all(torch.log2(s) == torch.round(torch.log2(s))))


@register_ptq(GGDPTQConfig)
def ggd_ptq(model: nn.Module, config: GGDPTQConfig, calib_loader: Iterable, *, progress: bool = False):
    """GGD PTQ (see the module docstring).  Returns ``(qmodel, report)``."""
    t0 = time.perf_counter()
    float_model = fold_batchnorm(model).eval()
    qmodel = quantize_model(float_model, config.recipe())
    # channels-last: BFT runs ~8 forward passes per layer and CPU convolutions are faster this way (kept
    # contiguous for a model whose forward needs it, e.g. x.view(x.size(0), -1) after a conv)
    first = next(iter(calib_loader))
    cl = supports_channels_last(qmodel, first[0] if isinstance(first, (tuple, list)) else first)
    if cl:
        qmodel = qmodel.to(memory_format=torch.channels_last)
    n = calibrate(qmodel, calib_loader, max_batches=config.calib_batches, progress=progress)
    image_gain = {}
    if config.folds_image_gain:
        by_quantizer: dict[int, dict[str, nn.Module]] = {}  # layers sharing the input's quantizer fold together
        for name in layer_positions(float_model).first:
            layer = qmodel.get_submodule(name)
            by_quantizer.setdefault(id(getattr(layer, "input_quant", None)), {})[name] = layer
        for group in by_quantizer.values():
            g = fold_input_gain(group)
            image_gain.update(dict.fromkeys(group, g))
    corrected = (correct_bias(qmodel, float_model, calib_loader, max_batches=config.calib_batches)
                 if config.bias_correction else None)
    if config.bias == "own":
        set_own_bias(qmodel, config.bias_bits, config.fl_radius)
    t_calib = time.perf_counter() - t0
    scorer = CalibScorer(float_model, calib_loader, config.bft_samples, channels_last=cl,
                         criterion=config.bft_criterion)
    holdout = (CalibScorer(float_model, calib_loader, config.bft_holdout, channels_last=cl,
                           criterion=config.bft_criterion, skip=config.bft_samples)
               if config.bft and config.bft_holdout else None)
    probe = scorer.batches[0][0]
    before_layers = ggd_layer_table(float_model, qmodel, probe)
    bft = None
    if config.bft:
        bft = backward_forward_tuning(qmodel, scorer, progress=progress, holdout=holdout)
        calib_after = bft["after"]
        calib_before = bft["before"]
    else:
        calib_before = calib_after = scorer.metrics(qmodel)
    layers = ggd_layer_table(float_model, qmodel, probe) if config.bft else before_layers
    warnings = [f"{r['layer']}: {r['w_zero_channels']} of {r['channels']} output channels quantize to all-zero "
                "weights with one weight FL per layer (per-channel ranges too far apart, e.g. a depthwise conv after "
                "BN folding); per_channel=True (--per-channel) gives each channel its own FL"
                for r in layers if r.get("w_zero_channels") and not config.per_channel]
    report = {
        "method": "ggd",
        "config": asdict(config),
        "warnings": warnings,
        "calib_batches": n,
        "image_gain": image_gain,
        "bias_correction": corrected,
        "calib_labels": scorer.labels,
        "calib_before_bft": calib_before,
        "calib_after_bft": calib_after,
        "sqnr_db": calib_after["sqnr_db"],
        "layers": layers,
        "layers_before_bft": before_layers if config.bft else None,
        "bft": bft,
        "seconds": {"calibrate": t_calib, "total": time.perf_counter() - t0},
    }
    return qmodel, report

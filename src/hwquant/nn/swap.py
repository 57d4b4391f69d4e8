"""Turn a float model into a fake-quantized one from a recipe, and calibrate it.

A :class:`QuantRecipe` maps module names to a :class:`LayerQuant` (weight spec, input-activation spec,
bias width).  :func:`quantize_model` swaps every ``nn.Conv2d`` / ``nn.Linear`` for its quantized twin;
:func:`calibrate` runs data through the float model to fit activation ranges.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..spec import QuantSpec
from .layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from .quantizer import FakeQuantizer


@dataclass(frozen=True)
class LayerQuant:
    """How one conv/linear layer is quantized: weight spec, input-activation spec, bias width.

    ``None`` for ``weight`` / ``act`` keeps that operand in float; ``bias_bits=None`` keeps the bias float.
    """

    weight: QuantSpec | None = QuantSpec(bits=8, signed=True, granularity="channel")
    act: QuantSpec | None = QuantSpec(bits=8, signed=None, granularity="tensor")
    bias_bits: int | None = 32

    def __post_init__(self) -> None:
        if self.bias_bits is not None and not (isinstance(self.bias_bits, int) and 8 <= self.bias_bits <= 32):
            raise ConfigError(f"bias_bits must be an integer in 8..32 or null, got {self.bias_bits!r}")


@dataclass(frozen=True)
class QuantRecipe:
    """Which layers get which :class:`LayerQuant`.

    ``overrides`` is a sequence of ``(pattern, LayerQuant | None)``; patterns are ``fnmatch`` globs on
    module names, plus the aliases ``<first>`` / ``<last>`` for the model's ``first_layer_name`` /
    ``last_layer_name``.  The last matching pattern wins; ``None`` keeps the layer float.
    """

    default: LayerQuant = LayerQuant()
    overrides: tuple[tuple[str, LayerQuant | None], ...] = field(default=())

    def for_layer(self, name: str, model: nn.Module) -> LayerQuant | None:
        aliases = {
            "<first>": getattr(model, "first_layer_name", None),
            "<last>": getattr(model, "last_layer_name", None),
        }
        choice: LayerQuant | None = self.default
        for pattern, lq in self.overrides:
            target = aliases.get(pattern, pattern)
            if target is not None and fnmatch.fnmatchcase(name, target):
                choice = lq
        return choice


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module,
    recipe: QuantRecipe,
    *,
    inplace: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Swap each ``nn.Conv2d`` / ``nn.Linear`` for ``QuantConv2d`` / ``QuantLinear`` per ``recipe``.

    Returns the model (a deep copy unless ``inplace``).  Quantizers start disabled and uncalibrated; call
    :func:`calibrate` (PTQ) or enable them in a QAT method.
    """
    if not inplace:
        model = copy.deepcopy(model)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYERS)
    ]
    for name, m in targets:
        lq = recipe.for_layer(name, model)
        if lq is None:
            continue
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls.from_float(m, lq.weight, lq.act, lq.bias_bits, generator))
    return model


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` for every quantized conv/linear layer."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """``(name, quantizer)`` for every :class:`FakeQuantizer` in the model."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            yield name, m


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on/off everywhere (calibrated parameters are kept)."""
    for _, q in quantizers(model):
        q.enabled = enabled and q.calibrated


def calibrate_weights(model: nn.Module) -> None:
    """Fit every weight quantizer to its layer's current weights (no data needed)."""
    for _, layer in quant_layers(model):
        if layer.weight_quant is not None:
            layer.weight_quant.calibrate_from(layer.weight.detach())


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> int:
    """Post-training calibration: weights from themselves, activations from data.

    Activation statistics are collected on the **float** model (every quantizer disabled), streaming one
    batch at a time, then every quantizer is fitted and enabled.  ``batches`` yields ``x`` or ``(x, y)``.
    Returns the number of batches seen; raises :class:`~hwquant.errors.DataError` if there were none.
    """
    was_training = model.training
    model.eval()
    set_quant_enabled(model, False)
    calibrate_weights(model)
    weight_qs = {id(layer.weight_quant) for _, layer in quant_layers(model)}
    acts = [(n, q) for n, q in quantizers(model) if id(q) not in weight_qs]
    for _, q in acts:
        q.enabled = False
        q.start_observing()
    seen = 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="calibrate", leave=False, total=max_batches)
    for batch in it:
        if max_batches is not None and seen >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(x)
        seen += 1
    if seen == 0:
        raise DataError("calibration loader is empty")
    for name, q in acts:
        try:
            q.calibrate()
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
    set_quant_enabled(model, True)
    model.train(was_training)
    return seen

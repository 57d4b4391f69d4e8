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

from ..device import model_device, to_device
from ..errors import ConfigError, DataError
from ..spec import QuantSpec
from .graph import LayerPositions, layer_positions, trace
from .layers import LUT_ACTIVATIONS, QUANT_LAYERS, QuantConv2d, QuantLinear, QuantLUTAct
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
    module names, plus the aliases ``<first>`` / ``<last>`` for the layers that read the model's input /
    produce its output, found from the traced graph by :func:`~hwquant.nn.graph.layer_positions` (the
    model's ``first_layer_name`` / ``last_layer_name`` attributes override it).  The last matching pattern
    wins; ``None`` keeps the layer float.  Elementwise activations replaced by
    :class:`~hwquant.nn.layers.QuantLUTAct` take the ``act`` spec of the entry matching their name.
    """

    default: LayerQuant = LayerQuant()
    overrides: tuple[tuple[str, LayerQuant | None], ...] = field(default=())

    def uses_positions(self) -> bool:
        return any(p in ("<first>", "<last>") for p, _ in self.overrides)

    def for_layer(self, name: str, model: nn.Module, positions: LayerPositions | None = None) -> LayerQuant | None:
        """The :class:`LayerQuant` of module ``name`` (``positions``: the model's first/last layers, found
        from its graph when not given and the recipe names ``<first>`` / ``<last>``)."""
        if positions is None and self.uses_positions():
            positions = layer_positions(model)
        aliases = {"<first>": positions.first, "<last>": positions.last} if positions is not None else {}
        choice: LayerQuant | None = self.default
        for pattern, lq in self.overrides:
            targets = aliases.get(pattern, (pattern,))
            if any(fnmatch.fnmatchcase(name, t) for t in targets):
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
    """Swap each ``nn.Conv2d`` / ``nn.Linear`` for ``QuantConv2d`` / ``QuantLinear`` per ``recipe``, and each
    elementwise activation of :data:`~hwquant.nn.layers.LUT_ACTIVATIONS` (hardswish, ...) for a
    :class:`~hwquant.nn.layers.QuantLUTAct` with the recipe's activation spec.

    Returns the model (a deep copy unless ``inplace``).  Quantizers start disabled and uncalibrated; call
    :func:`calibrate` (PTQ) or enable them in a QAT method.
    """
    if not inplace:
        model = copy.deepcopy(model)
    positions = layer_positions(model) if recipe.uses_positions() else None
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, *LUT_ACTIVATIONS)) and not isinstance(m, QUANT_LAYERS)
        and not _inside_lut(name, model)
    ]
    for name, m in targets:
        lq = recipe.for_layer(name, model, positions)
        if lq is None:
            continue
        if isinstance(m, LUT_ACTIVATIONS):
            if lq.act is not None:
                _set_submodule(model, name, QuantLUTAct(m, lq.act, generator))
            continue
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls.from_float(m, lq.weight, lq.act, lq.bias_bits, generator))
    share_input_quantizers(model)
    return model


def share_input_quantizers(model: nn.Module) -> list[str]:
    """Let every quantized layer that reads the model's input directly use one input quantizer (the first
    one's, when their specs agree): the hardware quantizes its input once, so calibration and tuning must
    see one scale.  Returns the names of the layers that now share it (nothing if fx cannot trace)."""
    try:
        graph = trace(model, leaves=(*QUANT_LAYERS, QuantLUTAct, FakeQuantizer))
    except ConfigError:
        return []
    mods = dict(model.named_modules())
    inputs = {n.name for n in graph.nodes if n.op == "placeholder"}
    quantized = []
    for n in graph.nodes:
        m = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(m, (*QUANT_LAYERS, QuantLUTAct)) and m.input_quant is not None and n.args \
                and isinstance(n.args[0], torch.fx.Node) and n.args[0].name in inputs:
            quantized.append((str(n.target), m))
    if len(quantized) < 2:
        return []
    first = quantized[0][1].input_quant
    if any(m.input_quant.spec != first.spec for _, m in quantized[1:]):
        return []
    for _, m in quantized[1:]:
        m.input_quant = first
    return [name for name, _ in quantized]


def _inside_lut(name: str, model: nn.Module) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), QuantLUTAct)


def read_batches(batches: Iterable, *, max_batches: int | None = None,
                 device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Read calibration data once into a list of ``(x, y)`` (``y = None`` for bare tensors).

    ``batches`` is any iterable a user has: a list, a generator (read once), a ``DataLoader``, yielding
    tensors ``x`` or ``(x, y, ...)`` pairs.  At most ``max_batches`` are read; tensors move to ``device``.
    The batches stay in memory (calibration sets are small; cap a large loader with ``max_batches``).

    Raises:
        DataError: no batch, or a batch that is not a tensor / ``(x, y)`` pair of tensors.
    """
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for batch in batches:
        if max_batches is not None and len(out) >= max_batches:
            break
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            x, y = batch[0], batch[1] if len(batch) > 1 else None
            if y is not None and not isinstance(y, torch.Tensor):
                raise DataError(f"calibration batch {len(out)}: labels must be a tensor, got {type(y).__name__}")
        else:
            raise DataError(f"calibration batch {len(out)} must be a tensor or an (x, y) pair of tensors, "
                            f"got {type(batch).__name__}")
        if device is not None:
            x, y = to_device((x, y), device)
        out.append((x, y))
    if not out:
        raise DataError("calibration loader is empty")
    return out


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` for every quantized conv/linear layer."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m


def float_eval_layers(model: nn.Module) -> dict[str, str]:
    """The quantized layers that evaluate in float rather than on an integer accumulator, with the reason
    (:meth:`~hwquant.nn.layers.QuantConv2d.no_integer_form`); empty when every layer is integer-exact."""
    return {name: why for name, m in quant_layers(model) if (why := m.no_integer_form()) is not None}


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


CALIB_WEIGHTS = ("quantized", "float")  # what activations are calibrated with (calibrate's ``weights``)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = False,
    weights: str = "quantized",
) -> int:
    """Post-training calibration: weights from themselves, activations from data.

    Weight quantizers are fitted first.  Activation statistics are then collected with every activation
    quantizer off (float activations), streaming one batch at a time (moved to the model's device), and every
    activation quantizer is fitted and enabled.  ``weights`` says what the activations are computed with:
    ``"quantized"`` (default; the calibrated weight quantizers are on, so each step is fitted to the
    activations that the deployed weights produce - Brevitas' calibration mode and AIMET's
    ``compute_encodings`` do the same) or ``"float"`` (the float model's activations, PyTorch's observer
    convention).  With a coarse weight grid the two differ: CQAT W5A4 with power-of-two steps on
    MobileNetV2 fits ReLU6 inputs with step 0.125 on quantized weights and 0.25-0.5 on float ones.
    ``batches`` yields ``x`` or ``(x, y)``.  Returns the number of batches seen; raises
    :class:`~hwquant.errors.DataError` if there were none.
    """
    if weights not in CALIB_WEIGHTS:
        raise ConfigError(f"calibration weights must be one of {', '.join(CALIB_WEIGHTS)}, got {weights!r}")
    was_training = model.training
    model.eval()
    set_quant_enabled(model, False)
    calibrate_weights(model)  # fitting a quantizer enables it
    weight_qs = {id(layer.weight_quant) for _, layer in quant_layers(model)}
    acts = [(n, q) for n, q in quantizers(model) if id(q) not in weight_qs]
    for _, layer in quant_layers(model):
        if layer.weight_quant is not None:
            layer.weight_quant.enabled = weights == "quantized"
    for _, q in acts:
        q.enabled = False
        q.start_observing()
    seen = 0
    it = batches
    device = model_device(model)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="calibrate", leave=False, total=max_batches)
    for batch in it:
        if max_batches is not None and seen >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(to_device(x, device))
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

"""ReLUs absorbed by the input quantizers that read them: one pass over the activation instead of two in training.

In a CNN the input of most conv / linear layers is a ReLU's output, and its activation quantizer is another
elementwise pass over the same tensor, forward and backward.  On a CPU both passes are bound by memory
traffic, so together they cost about twice what one does.  :func:`absorb_relus` finds every ``nn.ReLU``
module whose output goes only to quantized layers, as their input, and

* sets those layers' input quantizers to quantize ``relu(x)`` while they quantize
  (:attr:`FakeQuantizer.relu_input`, :attr:`FakeQuantizer.applies_relu`): in the fused kernel ReLU, the peak
  and the quantization share one pass and ReLU's gradient rule is in the mask (bit for bit what ``torch.relu``
  then the quantizer computes, forward and backward; elsewhere ``torch.relu`` runs first);
* replaces the module with an :class:`AbsorbedReLU`, which in training returns its input unchanged while
  every layer it feeds applies the ReLU in its quantizer, and is a plain ReLU otherwise (evaluation, export,
  quantizers switched off or observing, and any change to those layers made later).

Because ``relu`` is idempotent the model computes the same values whether the ReLU module ran or not, and in
training the ReLU costs one pass either way: the absorption changes the cost of a training step, never its
result (tested bit for bit against the same model without it, forward and backward).

Left alone, each kept as a ReLU of its own: a ReLU that feeds a layer which is also called elsewhere (its
quantizer would rectify that input too); a ReLU whose input is also read elsewhere (an in-place ReLU would
change what that reader sees) or whose output also goes anywhere else (a residual add, a pool, the model
output); a module called at several places not all of which qualify; functional ``F.relu`` / ``torch.relu``
calls (there is no module to replace); other activations; models that ``torch.fx`` cannot trace.  Forward
hooks on an absorbed ReLU see its input in training.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .graph import trace
from .layers import QUANT_LAYERS, QuantLUTAct
from .quantizer import FakeQuantizer

__all__ = ["AbsorbedReLU", "absorb_relus"]


class AbsorbedReLU(nn.ReLU):
    """An ``nn.ReLU`` whose work the quantized layers it feeds do in training (see the module docstring).

    ``layers``: those layers.  In training mode, while the input quantizer of every one of them applies the
    ReLU (:attr:`FakeQuantizer.applies_relu`), the forward returns ``x`` itself; otherwise it is ``nn.ReLU``.
    """

    def __init__(self, layers: list[nn.Module], inplace: bool = False):
        super().__init__(inplace=inplace)
        # a plain list: the layers belong to the model tree elsewhere (not submodules, not in the state dict)
        self.layers = list(layers)

    def absorbed(self) -> bool:
        """Whether the layers fed by this ReLU apply it now."""
        return bool(self.layers) and all(
            getattr(m, "input_quant", None) is not None and m.input_quant.applies_relu for m in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.absorbed():
            return x
        return F.relu(x, inplace=self.inplace)


def _only_input_of_quantized(node: torch.fx.Node, mods: dict[str, nn.Module],
                             calls: dict[str, int]) -> list[nn.Module] | None:
    """The quantized layers that read ``node`` (a ReLU call), if they are its only readers, read it only as
    their input and are called nowhere else (``calls``: call sites per module name), and its input is read by
    nothing else."""
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
        return None
    if len(node.args[0].users) != 1 or not node.users:
        return None
    layers = []
    for user in node.users:
        m = mods.get(str(user.target)) if user.op == "call_module" else None
        if not isinstance(m, QUANT_LAYERS) or m.input_quant is None or user.kwargs:
            return None
        if user.args[0] is not node or any(a is node for a in user.args[1:]) or calls[str(user.target)] != 1:
            return None
        layers.append(m)
    return layers


def absorb_relus(model: nn.Module) -> list[str]:
    """Let the input quantizers of ``model``'s quantized layers apply the ``nn.ReLU`` modules that only feed
    them (see the module docstring); ``model`` is modified in place.  Returns the names of the absorbed ReLUs
    (empty when fx cannot trace the model)."""
    try:
        graph = trace(model, leaves=(*QUANT_LAYERS, QuantLUTAct, FakeQuantizer, nn.ReLU), what="ReLU absorption")
    except ConfigError:
        return []
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    sites: dict[str, list[list[nn.Module] | None]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(mods.get(str(node.target))) is nn.ReLU:
            sites.setdefault(str(node.target), []).append(_only_input_of_quantized(node, mods, calls))
    # a quantizer object read by a layer the ReLU does not feed would quantize that layer's input wrongly
    owners: dict[int, int] = {}
    for m in mods.values():
        if isinstance(m, (*QUANT_LAYERS, QuantLUTAct)) and m.input_quant is not None:
            owners[id(m.input_quant)] = owners.get(id(m.input_quant), 0) + 1
    absorbed = []
    for name, calls in sites.items():
        if any(c is None for c in calls):
            continue
        layers = list({id(m): m for c in calls for m in c}.values())
        if any(owners[id(m.input_quant)] != 1 for m in layers):
            continue
        for m in layers:
            m.input_quant.relu_input = True
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, AbsorbedReLU(layers, mods[name].inplace))
        absorbed.append(name)
    return absorbed

"""ReLUs absorbed by (or fused with) the input quantizers that read them: fewer passes over an activation in
training.

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

A ReLU whose output feeds one quantized layer and one other reader (in a residual network: the next block's
first conv and the identity shortcut) becomes a :class:`SharedReLU`: in training one kernel pass computes
``relu(x)`` for the other reader and the quantized input of the layer, which its quantizer then returns, and
one backward pass computes what autograd computes unfused (the straight-through gradient, the sum with the
other reader's, ReLU's rule), bit for bit (:mod:`hwquant.numerics.fused_relu`).

Left alone, each kept as a ReLU of its own: a ReLU that feeds a layer which is also called elsewhere (its
quantizer would rectify that input too); a ReLU whose input is also read elsewhere (an in-place ReLU would
change what that reader sees) or whose output also goes anywhere else (a residual add, a pool, the model
output); a module called at several places not all of which qualify; functional ``F.relu`` / ``torch.relu``
calls (there is no module to replace); other activations; models that ``torch.fx`` cannot trace.  Forward
hooks on an absorbed ReLU see its input in training.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .graph import arg_nodes, trace
from .layers import QUANT_LAYERS, QuantLUTAct
from .quantizer import FakeQuantizer

__all__ = ["AbsorbedReLU", "SharedReLU", "absorb_relus"]


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


class SharedReLU(nn.ReLU):
    """An ``nn.ReLU`` whose output feeds one quantized layer's input and one other reader (a residual add, a
    pool): in training it computes ``relu(x)`` and the layer's quantized input in one pass, and both
    gradients in one backward pass (:meth:`FakeQuantizer.relu_pair`); otherwise, or where the kernel does not
    cover the input, it is ``nn.ReLU``.  (A forward pre-hook that replaces the layer's input makes the layer
    quantize that new input as usual; its EMA then takes the step's peak twice.)"""

    def __init__(self, layer: nn.Module, inplace: bool = False):
        super().__init__(inplace=inplace)
        self.layers = [layer]  # a plain list, as in AbsorbedReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = getattr(self.layers[0], "input_quant", None) if self.training else None
        if q is not None and not q.relu_input:
            r = q.relu_pair(x)
            if r is not None:
                return r
        return F.relu(x, inplace=self.inplace)


def _reads_as_input(user: torch.fx.Node, node: torch.fx.Node, m: nn.Module | None, calls: dict[str, int]) -> bool:
    """Whether ``user`` is a quantized layer with an input quantizer that reads ``node`` as its input only and is
    called nowhere else (``calls``: call sites per module name)."""
    return (isinstance(m, QUANT_LAYERS) and m.input_quant is not None and not user.kwargs and user.args[0] is node
            and not any(a is node for a in user.args[1:]) and calls[str(user.target)] == 1)


def _in_place(user: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Whether ``user`` may write into its input (``x.add_(...)``, ``F.relu(x, inplace=True)``, an in-place
    module): the quantized copy made beside ``relu(x)`` would then be stale."""
    if user.kwargs.get("inplace"):
        return True
    if user.op == "call_module":
        return bool(getattr(mods.get(str(user.target)), "inplace", False))
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _site(node: torch.fx.Node, mods: dict[str, nn.Module], calls: dict[str, int]):
    """What a ReLU call can become: ``("absorbed", layers)`` when quantized layers are its only readers,
    ``("shared", [layer])`` when one quantized layer and one other reader (reading it once, not in place) are,
    else ``None``; in both cases its input must be read by nothing else."""
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
        return None
    if len(node.args[0].users) != 1 or not node.users:
        return None
    layers, others = [], []
    for user in node.users:
        m = mods.get(str(user.target)) if user.op == "call_module" else None
        if _reads_as_input(user, node, m, calls):
            layers.append(m)
        else:
            others.append(user)
    if layers and not others:
        return "absorbed", layers
    if len(layers) == 1 and len(others) == 1:
        other = others[0]
        if sum(a is node for a in arg_nodes((other.args, other.kwargs))) == 1 and not _in_place(other, mods):
            return "shared", layers
    return None


def absorb_relus(model: nn.Module) -> list[str]:
    """Let the input quantizers of ``model``'s quantized layers apply the ``nn.ReLU`` modules that only feed
    them (:class:`AbsorbedReLU`), and fuse a ReLU that feeds one of them and one other reader with that
    quantizer (:class:`SharedReLU`); see the module docstring.  ``model`` is modified in place.  Returns the
    names of the ReLUs replaced (empty when fx cannot trace the model)."""
    try:
        graph = trace(model, leaves=(*QUANT_LAYERS, QuantLUTAct, FakeQuantizer, nn.ReLU), what="ReLU absorption")
    except ConfigError:
        return []
    mods = dict(model.named_modules())
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    sites: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(mods.get(str(node.target))) is nn.ReLU:
            sites.setdefault(str(node.target), []).append(_site(node, mods, calls))
    # a quantizer object read by a layer the ReLU does not feed would quantize that layer's input wrongly
    owners = Counter(id(m.input_quant) for m in mods.values()
                     if isinstance(m, (*QUANT_LAYERS, QuantLUTAct)) and m.input_quant is not None)
    replaced = []
    for name, found in sites.items():
        if any(f is None for f in found):
            continue
        kinds = {kind for kind, _ in found}
        layers = list({id(m): m for _, ls in found for m in ls}.values())
        if any(owners[id(m.input_quant)] != 1 for m in layers):
            continue
        if kinds == {"absorbed"}:
            for m in layers:
                m.input_quant.relu_input = True
            relu = AbsorbedReLU(layers, mods[name].inplace)
        elif kinds == {"shared"} and len(found) == 1:
            relu = SharedReLU(layers[0], mods[name].inplace)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, relu)
        replaced.append(name)
    return replaced

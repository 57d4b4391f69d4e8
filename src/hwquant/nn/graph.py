"""The model's graph as the quantization passes see it: ``torch.fx`` tracing with errors that name the place,
and the positions of the conv/linear layers in it (which layers see the input, which produce the output).

:func:`trace` wraps ``torch.fx`` so that a model it cannot trace (data-dependent control flow, an
unsupported Python construct) gives one :class:`~hwquant.errors.ConfigError` naming the module being traced
and the last graph node recorded before the failure, instead of fx's multi-line traceback.

:func:`layer_positions` answers "which layers are first and last" from the data flow, for any model:
a conv/linear layer is *first* when the model's input reaches it through no other conv/linear layer (every
layer that reads the input when a stem is split in branches), *last* when its output reaches the model's
output through no other conv/linear layer.  A model's own ``first_layer_name`` / ``last_layer_name``
attributes (a name or a list of names) override the graph.  A model that fx cannot trace falls back to
module registration order (the first and the last conv/linear module), and the result says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..errors import ConfigError

__all__ = ["LayerPositions", "arg_nodes", "layer_positions", "trace"]

_LAYER_TYPES = (nn.Conv2d, nn.Linear)


class _Tracer(torch.fx.Tracer):
    """fx tracer with extra leaf types that remembers which module it was in when tracing failed."""

    def __init__(self, leaves: tuple[type, ...] = ()):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaves and isinstance(m, self.leaves):
            return True
        if isinstance(m, nn.ReLU):  # a subclass (hwquant's AbsorbedReLU among them) is still one ReLU node
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = f"{self.path_of_module(m) or '<root>'} ({type(m).__name__})"
                except NameError:
                    self.failed_in = type(m).__name__
            raise


def trace(model: nn.Module, leaves: tuple[type, ...] = (), what: str = "quantization") -> torch.fx.Graph:
    """The ``torch.fx`` graph of ``model`` (modules of types ``leaves`` kept as single nodes).

    Raises:
        ConfigError: fx cannot trace the model; the one-line message names the module and the last node
            traced before the failure.
    """
    tracer = _Tracer(leaves)
    try:
        return tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        last = None
        graph = getattr(tracer, "graph", None)
        if graph is not None:
            nodes = [n for n in graph.nodes if n.op != "placeholder"]
            last = nodes[-1].name if nodes else None
        where = f" in module {tracer.failed_in}" if tracer.failed_in else ""
        after = f" after node {last!r}" if last else ""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what}: torch.fx cannot trace {type(model).__name__}{where}{after}: {msg}") from None


@dataclass(frozen=True)
class LayerPositions:
    """Names of the first and last conv/linear layers and where that came from (``graph``, ``attribute``,
    ``module order``)."""

    first: tuple[str, ...]
    last: tuple[str, ...]
    source: str


def _names(v, valid: set[str]) -> tuple[str, ...] | None:
    if v is None:
        return None
    names = (v,) if isinstance(v, str) else tuple(v)
    for n in names:
        if n not in valid:
            raise ConfigError(f"first/last layer name {n!r} is not a conv/linear layer of the model")
    return names


def _layer_types(extra: Iterable[type]) -> tuple[type, ...]:
    return (*_LAYER_TYPES, *extra)


def layer_positions(model: nn.Module, extra_layer_types: Iterable[type] = (), *,
                    use_attributes: bool = True) -> LayerPositions:
    """First and last conv/linear layers of ``model`` (see the module docstring); ``use_attributes=False``
    ignores the model's ``first_layer_name`` / ``last_layer_name``."""
    types = _layer_types(extra_layer_types)
    mods = dict(model.named_modules())
    layers = [n for n, m in mods.items() if isinstance(m, types)]
    valid = set(layers)
    first = _names(getattr(model, "first_layer_name", None), valid) if use_attributes else None
    last = _names(getattr(model, "last_layer_name", None), valid) if use_attributes else None
    if first is not None and last is not None:
        return LayerPositions(first, last, "attribute")
    try:
        graph = trace(model, leaves=types)
    except ConfigError:
        order = (layers[:1], layers[-1:])
        return LayerPositions(first or tuple(order[0]), last or tuple(order[1]), "module order")
    # the nearest upstream layers of every value ("" stands for the model input)
    src: dict[str, frozenset[str]] = {}
    g_first: list[str] = []
    g_last: list[str] = []

    def upstream(args) -> frozenset[str]:
        out: set[str] = set()
        for a in arg_nodes(args):
            out |= src.get(a.name, frozenset())
        return frozenset(out)

    for node in graph.nodes:
        if node.op == "placeholder":
            src[node.name] = frozenset({""})
        elif node.op == "call_module" and node.target in valid:
            ups = upstream((node.args, node.kwargs))
            if "" in ups and node.target not in g_first:
                g_first.append(str(node.target))
            src[node.name] = frozenset({str(node.target)})
        elif node.op == "output":
            g_last = [n for n in layers if n in upstream(node.args)]
        else:
            src[node.name] = upstream((node.args, node.kwargs))
    return LayerPositions(first or tuple(g_first), last or tuple(g_last), "graph")


def arg_nodes(args) -> list[torch.fx.Node]:
    """The graph nodes in ``args`` (nested tuples, lists, dicts), one entry per use."""
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out

"""Fold BatchNorm into the preceding convolution (hardware has no BatchNorm).

For ``y = BN(conv(x))`` with running statistics ``mu, var``, affine ``gamma, beta`` and ``eps``::

    k  = gamma / sqrt(var + eps)                (per output channel)
    W' = W * k[:, None, None, None]
    b' = (b - mu) * k + beta                    (b = 0 if the conv had no bias)

so ``conv'(x) == BN(conv(x))`` in eval mode.  Computed in float64, stored in the model's dtype.  A BN without
affine parameters (``affine=False``) folds with ``gamma = 1, beta = 0``; one without running statistics
(``track_running_stats=False``) normalises every batch with that batch's own statistics, which no fixed
integer layer can do: folding it is a :class:`~hwquant.errors.ConfigError` naming the layer.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from ..errors import ConfigError
from .graph import trace


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for each BatchNorm2d fed only by a Conv2d (found by ``torch.fx`` tracing).

    Raises:
        ConfigError: the model cannot be traced (the message names the module), or a BN to fold has no
            running statistics.
    """
    graph = trace(model, what="BatchNorm folding")
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            if mods[node.target].running_mean is None or mods[node.target].running_var is None:
                raise ConfigError(f"{node.target}: BatchNorm2d without running statistics (track_running_stats=False) "
                                  "normalises each batch with its own statistics and cannot be folded into a layer")
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (``conv`` gains a bias)."""
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    k = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * k.reshape(-1, 1, 1, 1)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    b = (b - bn.running_mean.double()) * k + beta
    conv.weight.copy_(w.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(b.to(conv.weight.dtype))
    else:
        conv.bias.copy_(b.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with every conv->BN pair folded and the BN replaced
    by ``nn.Identity``.  Module names are unchanged."""
    if not inplace:
        model = copy.deepcopy(model)
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    return model

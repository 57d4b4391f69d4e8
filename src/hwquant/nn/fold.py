"""Fold BatchNorm into the preceding convolution (hardware has no BatchNorm), and an input gain into the layer
that reads the image (:func:`fold_input_gain`).

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
import math
from collections.abc import Mapping

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


@torch.no_grad()
def fold_input_gain(layers: Mapping[str, nn.Module]) -> float:
    """Make the quantized layers that read the model input through one input quantizer (usually one layer;
    several where a stem is split in branches that share it) use a power-of-two input step, computing the same.

    The calibrated input step ``s`` (per tensor, zero point 0) becomes ``p = 2^round(log2 s)`` with the input
    gain ``g = fl32(p / s)`` (:meth:`~hwquant.nn.FakeQuantizer.set_input_gain`), and every layer's float
    weights become ``W / g`` (biases unchanged), so ``conv(g x, W / g) = conv(x, W)`` and the input codes
    ``rne(g x / p)`` are those of ``rne(x / s)`` (up to the rounding of ``g`` and of ``g x``).  The host applies
    ``g`` to the normalised image (fold it into the normalisation's standard deviation: ``std / g``), so the
    integer datapath sees power-of-two scales only: the accumulator scale ``p * s_w`` and every requantization
    stay shifts.  Calibrated weight quantizers are refitted to the new weights.  Returns ``g`` (1.0 when ``s``
    is already a power of two: nothing changes).

    Raises:
        ConfigError: naming the layer: no calibrated per-tensor symmetric input quantizer, one not shared by
            the others, or one that already has a gain.
    """
    if not layers:
        raise ConfigError("fold_input_gain needs at least one layer")
    items = list(layers.items())
    name, first = items[0]
    iq = getattr(first, "input_quant", None)
    if iq is None or not (iq.enabled and iq.calibrated) or iq.axis is not None or not iq.spec.symmetric \
            or iq.windowed:
        raise ConfigError(f"{name}: an input gain needs a calibrated per-tensor input quantizer with zero point 0 "
                          "and a plain step")
    for other, layer in items[1:]:
        if getattr(layer, "input_quant", None) is not iq:
            raise ConfigError(f"{other}: does not share {name}'s input quantizer (fold each quantizer's layers "
                              "together)")
    if iq.input_gain != 1.0:
        raise ConfigError(f"{name}: its input quantizer already has an input gain ({iq.input_gain:g})")
    s = float(iq.scale)
    p = 2.0 ** round(math.log2(s))
    if p == s:
        return 1.0
    g = iq.set_input_gain(p / s)
    iq.scale = torch.full_like(iq.scale, p)
    for _, layer in items:
        layer.weight.copy_((layer.weight.double() / g).to(layer.weight.dtype))
        wq = getattr(layer, "weight_quant", None)
        if wq is not None and wq.calibrated:
            enabled = wq.enabled
            wq.calibrate_from(layer.weight.detach())
            wq.enabled = enabled
    return g

"""The graph walk of :func:`hwquant.export.integer_model`: trace a fake-quantized model with ``torch.fx``
(quantized layers, :class:`~hwquant.nn.QuantAct`, :class:`~hwquant.nn.layers.QuantLUTAct` and quantizers as
leaves) and translate every node into integer operations through a :class:`~hwquant.export.builder.Builder`;
anything without an integer form is a one-line :class:`~hwquant.errors.ConfigError` naming the node.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn.graph import trace as _trace
from ..nn.layers import LUT_ACTIVATIONS, QUANT_LAYERS, QuantAct, QuantLUTAct
from ..nn.quantizer import FakeQuantizer
from ..numerics.codes import qrange
from .builder import Builder, Val
from .intops import IntOp

__all__ = ["Converted", "convert"]

_LEAVES = (*QUANT_LAYERS, QuantAct, FakeQuantizer, QuantLUTAct)


class Converted(NamedTuple):
    """What :func:`convert` gives :class:`~hwquant.export.integer.IntegerModel`."""

    ops: list[IntOp]
    input_quant: FakeQuantizer
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]


class _Shape(tuple):
    """A traced ``x.shape`` / ``x.size()``: the example's sizes (reshape arguments resolve against them)."""



def convert(qmodel: nn.Module, example_input: torch.Tensor) -> Converted:
    """Trace ``qmodel`` (eval mode, quantized layers as leaves) and translate it into integer ops."""
    graph = _trace(qmodel, leaves=_LEAVES, what="integer export")
    b = Builder(qmodel)
    env: dict[str, Any] = {}
    st: dict[str, Any] = {"input_quant": None, "input_name": None, "input_val": None, "input_layer": None}
    output_name = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if st["input_name"] is not None:
                raise ConfigError(f"{node.name}: integer export supports models with one input")
            st["input_name"] = b.input_name = node.name
            env[node.name] = ("input", node)
            continue
        if node.op == "get_attr":
            raise ConfigError(f"{node.name}: a tensor attribute ({node.target}) used in forward has no integer form "
                              "here; make it a module")
        args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "output":
            out = args[0]
            if isinstance(out, Val):
                out = b.materialize(out, "output")
            if not isinstance(out, Val) or out.divisor != 1:
                raise ConfigError("the model output must be a layer's accumulator (an integer value)")
            output_name = out.name
            continue
        if node.op == "call_module":
            env[node.name] = _module_node(b, st, node, b.mods[node.target], args, example_input)
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _function_node(b, st, node, args, kwargs, example_input)
        else:
            raise ConfigError(f"{node.name}: unsupported graph node {node.op}")
    if st["input_quant"] is None or output_name is None:
        raise ConfigError("the model has no quantized first layer or no output")
    return Converted(b.ops, st["input_quant"], st["input_name"], output_name, tuple(example_input.shape))


def _val(a: Any, node: torch.fx.Node) -> Val:
    if isinstance(a, tuple) and a and a[0] == "input":
        raise ConfigError(f"{node.name}: the float input must first meet a quantized layer "
                          f"({node.op} {_op_name(node)})")
    if not isinstance(a, Val):
        raise ConfigError(f"{node.name}: unsupported argument {a!r} of {_op_name(node)}")
    return a


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _input_val(b: Builder, st: dict[str, Any], q: FakeQuantizer | None, name: str, example: torch.Tensor) -> Val:
    """The model input as codes of ``q``, the input quantizer of layer ``name`` (shared by every layer that
    reads the input, which must then quantize it alike)."""
    if q is None or not (q.enabled and q.calibrated):
        raise ConfigError(f"{name}: the first layer's input is not quantized")
    if not q.spec.symmetric or q.axis is not None or q.spec.rounding != "nearest":
        raise ConfigError(f"{name}: the input quantizer must be per tensor, zero point 0, rounding='nearest'")
    if q.windowed:
        raise ConfigError(f"{name}: the model input's quantizer is a bit window; export quantizes the input in one "
                          "stage (quantize the first layer's input with a plain step, e.g. first_last_bits)")
    qmin, qmax = qrange(q.spec.bits, bool(q.signed), q.spec.narrow)
    s_in = q.scale.detach().float().reshape(())
    if st["input_val"] is not None:
        a = st["input_val"]
        g0 = st["input_quant"].input_gain
        if not (torch.equal(a.codes[0], s_in) and a.codes[1:] == (qmin, qmax) and q.input_gain == g0):
            raise ConfigError(f"{name} and {st['input_layer']} both read the model input but quantize it differently "
                              f"(scale {float(s_in):g} [{qmin}, {qmax}] gain {q.input_gain:.9g} vs "
                              f"{float(a.codes[0]):g} [{a.codes[1]}, {a.codes[2]}] gain {g0:.9g}); the hardware "
                              "quantizes its input once")
        return a
    codes = q.codes(torch.zeros(example.shape)).to(torch.int64)
    a = Val(st["input_name"], s_in.double(), float(max(-qmin, qmax)), codes, (s_in, qmin, qmax))
    b.vals[st["input_name"]] = a
    st.update(input_quant=q, input_val=a, input_layer=name)
    return a


def _is_input(a: Any) -> bool:
    return isinstance(a, tuple) and not isinstance(a, _Shape) and len(a) == 2 and a[0] == "input"


def _module_node(b: Builder, st: dict[str, Any], node: torch.fx.Node, m: nn.Module, args, example) -> Any:
    name = str(node.target)
    if isinstance(m, QUANT_LAYERS):
        a = _input_val(b, st, m.input_quant, name, example) if _is_input(args[0]) else _val(args[0], node)
        return b.layer(name, m, a)
    if isinstance(m, QuantLUTAct):
        a = _input_val(b, st, m.input_quant, name, example) if _is_input(args[0]) else _val(args[0], node)
        return b.lut(name, m, a)
    if isinstance(m, QuantAct):
        return b.requant(_val(args[0], node), m.quant, name)
    if isinstance(m, nn.ReLU):
        return _relu(b, name, _val(args[0], node))
    if isinstance(m, nn.Hardtanh):  # ReLU6 included
        return _val(args[0], node).with_clip(m.min_val, m.max_val)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return _val(args[0], node)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise ConfigError(f"{name}: only AdaptiveAvgPool2d(1) has an integer form here")
        return _global_pool(b, name, _val(args[0], node))
    if isinstance(m, nn.AvgPool2d):
        return _avg_pool(b, name, _val(args[0], node), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                         m.count_include_pad, m.divisor_override)
    if isinstance(m, nn.MaxPool2d):
        return _max_pool(b, name, _val(args[0], node), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                         m.return_indices)
    if isinstance(m, nn.Flatten):
        return _reshape_flat(b, name, _val(args[0], node), m.start_dim, m.end_dim)
    if isinstance(m, nn.Upsample):
        return _upsample(b, name, _val(args[0], node), m.size, m.scale_factor, m.mode)
    if isinstance(m, nn.BatchNorm2d):
        raise ConfigError(f"{name}: BatchNorm must be folded before integer export (fold_batchnorm; a BN that does "
                          "not follow a conv cannot be folded)")
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        raise ConfigError(f"{name}: layer is not quantized; integer export needs every conv/linear quantized")
    if isinstance(m, LUT_ACTIVATIONS):
        raise ConfigError(f"{name}: {type(m).__name__} is not quantized (quantize_model turns it into a QuantLUTAct "
                          "when the recipe gives it an activation spec)")
    raise ConfigError(f"{name}: module {type(m).__name__} has no integer form here")


_ADD = (operator.add, torch.add, "add", operator.iadd, "add_")
_RELU = (F.relu, torch.relu, "relu", torch.relu_, "relu_")
_CLAMP = (torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_", F.hardtanh, F.relu6, "clamp_min", "clamp_max")
_FLAT = (torch.flatten, "flatten", "view", "reshape", torch.reshape)
_PASS = ("contiguous", F.dropout, F.dropout2d)


def _arg(args, kwargs, i: int, key: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _function_node(b: Builder, st: dict[str, Any], node: torch.fx.Node, args, kwargs, example) -> Any:
    t = node.target
    name = node.name
    # shape queries: x.size(), x.size(0), x.shape, x.shape[0], len(...)
    if t == "size" or (t is getattr and len(args) > 1 and args[1] == "shape"):
        src = args[0]
        shape = _Shape(example.shape if _is_input(src) else _val(src, node).example.shape)
        dim = args[1] if t == "size" and len(args) > 1 else kwargs.get("dim")
        return shape[dim] if isinstance(dim, int) else shape
    if t is operator.getitem and isinstance(args[0], _Shape):
        return args[0][args[1]]
    if t in _ADD:
        if len(args) != 2 or not all(isinstance(a, Val) for a in args) or set(kwargs) - {"alpha"} or \
                kwargs.get("alpha", 1) != 1:
            raise ConfigError(f"{name}: only the sum of two tensors is supported ({_op_name(node)})")
        return b.add(name, _val(args[0], node), _val(args[1], node))
    if t in _RELU:
        return _relu(b, name, _val(args[0], node))
    if t in _CLAMP:
        v = _val(args[0], node)
        if t is F.relu6:
            lo, hi = 0.0, 6.0
        elif t is F.hardtanh:
            lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        elif t == "clamp_min":
            lo, hi = _arg(args, kwargs, 1, "min"), None
        elif t == "clamp_max":
            lo, hi = None, _arg(args, kwargs, 1, "max")
        else:
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
        for bound in (lo, hi):
            if bound is not None and not isinstance(bound, (int, float)):
                raise ConfigError(f"{name}: {_op_name(node)} needs constant number bounds for an integer form")
        return v.with_clip(-math.inf if lo is None else lo, math.inf if hi is None else hi)
    if t in _FLAT:
        v = _val(args[0], node)
        if t in (torch.flatten, "flatten"):
            return _reshape_flat(b, name, v, _arg(args, kwargs, 1, "start_dim", 0),
                                 _arg(args, kwargs, 2, "end_dim", -1))
        shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size"),)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"{name}: {_op_name(node)} with a shape of {shape!r} has no integer form here")
        target = v.example.reshape(*shape).shape
        if target == v.example.shape:
            return v
        if len(target) == 2 and target[0] == v.example.shape[0]:
            return _reshape_flat(b, name, v, 1, -1)
        raise ConfigError(f"{name}: {_op_name(node)} to {tuple(shape)} has no integer form here (only (N, -1))")
    if t in _PASS:
        return _val(args[0], node)
    if t in (torch.cat, torch.concat, torch.concatenate):
        vals = [_val(a, node) for a in _arg(args, kwargs, 0, "tensors")]
        return b.concat(name, vals, _arg(args, kwargs, 1, "dim", 0))
    if t is F.max_pool2d:
        ks = _arg(args, kwargs, 1, "kernel_size")
        return _max_pool(b, name, _val(args[0], node), ks, _arg(args, kwargs, 2, "stride") or ks,
                         _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                         _arg(args, kwargs, 5, "ceil_mode", False), _arg(args, kwargs, 6, "return_indices", False))
    if t is F.avg_pool2d:
        ks = _arg(args, kwargs, 1, "kernel_size")
        return _avg_pool(b, name, _val(args[0], node), ks, _arg(args, kwargs, 2, "stride") or ks,
                         _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "ceil_mode", False),
                         _arg(args, kwargs, 5, "count_include_pad", True), _arg(args, kwargs, 6, "divisor_override"))
    if t is F.adaptive_avg_pool2d:
        if _pair(_arg(args, kwargs, 1, "output_size")) != (1, 1):
            raise ConfigError(f"{name}: only adaptive_avg_pool2d(x, 1) has an integer form here")
        return _global_pool(b, name, _val(args[0], node))
    if t in (torch.mean, "mean"):
        v = _val(args[0], node)
        dims = _arg(args, kwargs, 1, "dim")
        keep = _arg(args, kwargs, 2, "keepdim", False)
        nd = v.example.dim()
        dims = sorted(d % nd for d in ((dims,) if isinstance(dims, int) else tuple(dims or ())))
        if nd != 4 or dims != [2, 3]:
            raise ConfigError(f"{name}: mean has an integer form over the spatial dims (2, 3) only, got {dims}")
        pooled = _global_pool(b, name, v)
        return pooled if keep else _reshape_flat(b, f"{name}.flatten", pooled, 1, -1)
    if t is F.interpolate:
        return _upsample(b, name, _val(args[0], node), _arg(args, kwargs, 1, "size"),
                         _arg(args, kwargs, 2, "scale_factor"), _arg(args, kwargs, 3, "mode", "nearest"))
    raise ConfigError(f"{name}: {node.op.replace('call_', '')} {_op_name(node)!r} has no integer form here")


def _relu(b: Builder, name: str, v: Val) -> Val:
    if v.clip is not None:  # relu(clip(x, lo, hi)) = clip(x, max(lo, 0), max(hi, 0))
        return Val(v.name, v.scale, v.bound, v.example, v.codes, v.divisor,
                    (v.clip[0].clamp_min(0), v.clip[1].clamp_min(0)))
    return b.unary("relu", name, v)


def _global_pool(b: Builder, name: str, v: Val) -> Val:
    hw = v.example.shape[2] * v.example.shape[3]
    return b.unary("sumpool", name, v, {"global": True, "divisor": hw}, bound=v.bound * hw, divisor=hw)


def _avg_pool(b: Builder, name: str, v: Val, kernel, stride, padding, ceil_mode, count_include_pad,
              divisor_override) -> Val:
    if ceil_mode or divisor_override is not None or not count_include_pad:
        raise ConfigError(f"{name}: average pooling needs ceil_mode=False, count_include_pad=True")
    kk = _pair(kernel)
    st = _pair(stride if stride is not None else kernel)
    n = kk[0] * kk[1]
    return b.unary("sumpool", name, v, {"kernel_size": kk, "stride": st, "padding": _pair(padding), "divisor": n},
                   bound=v.bound * n, divisor=n)


def _max_pool(b: Builder, name: str, v: Val, kernel, stride, padding, dilation, ceil_mode, return_indices) -> Val:
    if ceil_mode or return_indices:
        raise ConfigError(f"{name}: max pooling needs ceil_mode=False and no indices")
    return b.unary("maxpool", name, v, {"kernel_size": _pair(kernel), "stride": _pair(stride or kernel),
                                        "padding": _pair(padding), "dilation": _pair(dilation)},
                   keep_codes=True, clip=v.clip)


def _upsample(b: Builder, name: str, v: Val, size, scale_factor, mode) -> Val:
    if mode != "nearest":
        raise ConfigError(f"{name}: upsampling mode {mode!r} has no integer form here (nearest only)")
    h, w = v.example.shape[2], v.example.shape[3]
    if size is not None:
        oh, ow = _pair(size)
        if oh % h or ow % w:
            raise ConfigError(f"{name}: nearest upsampling to {(oh, ow)} from {(h, w)} is not by integer factors")
        sc = (oh // h, ow // w)
    else:
        f = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        if not all(float(x) == int(x) and int(x) >= 1 for x in f):
            raise ConfigError(f"{name}: nearest upsampling needs integer scale factors, got {scale_factor!r}")
        sc = (int(f[0]), int(f[1]))
    return b.unary("upsample", name, v, {"factor": sc}, keep_codes=True, clip=v.clip)


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _reshape_flat(b: Builder, name: str, v: Val, start: int, end: int) -> Val:
    """``flatten(x, 1)`` (and every reshape to ``(N, -1)``)."""
    ex = v.example
    if start != 1 or end not in (-1, ex.dim() - 1):
        raise ConfigError(f"{name}: only flatten(x, 1) is supported")
    spatial = int(math.prod(ex.shape[2:])) if ex.dim() > 2 else 1

    def rep(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1)
        return t.repeat_interleave(spatial) if t.numel() > 1 and spatial > 1 else t

    clip = (rep(v.clip[0]), rep(v.clip[1])) if v.clip is not None else None
    s = rep(v.scale) if v.scale.dim() else v.scale
    return b.unary("flatten", name, v, {"start_dim": 1}, scale=s, keep_codes=True, clip=clip)



# ----------------------------------------------------------------------------------------------- comparison

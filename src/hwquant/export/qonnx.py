"""QONNX export: ``Quant`` nodes at any bit width, written from the integer model and checked with qonnx.

Standard ONNX has integer types of 4, 8 and 16 bits only (:mod:`hwquant.export.onnx` stores a 5-bit weight in
``INT8`` and clips).  QONNX (https://github.com/fastmachinelearning/qonnx) adds a ``Quant`` node (domain
``qonnx.custom_op.general``; inputs ``x, scale, zeropt, bitwidth``; attributes ``signed``, ``narrow``,
``rounding_mode``) that states the width itself::

    y = scale * (clamp(round(x / scale + zeropt), min_int, max_int) - zeropt)     (round half to even)

with ``[min_int, max_int]`` the ``bitwidth``-bit signed / unsigned (``narrow``: one code fewer) range.  The
graph is built here, one node group per :class:`~hwquant.export.integer.IntOp`, mirroring
:func:`hwquant.export.onnx.to_onnx`:

* the input quantizer (after a ``Mul`` by the input gain where the first layer has one) and every ``requant``
  -> ``Quant(scale, zeropt 0, bits)`` with the op's own width, sign and range (5-bit weights, 3/4/6-bit
  activations, 8-bit first/last layers, all natively); a bit-window requantization (CQAT ``step="window"``)
  -> ``Quant(d8, 8 bits)`` then ``Quant(2^shift d8, bits)``: exact with power-of-two steps; with float steps
  the second ``Quant`` divides ``fl32(c8 d8)`` by ``2^shift d8``, which can miss a shifter tie by an ulp (the
  QDQ graph takes the codes as exact floats instead);
* ``conv2d`` / ``linear`` -> a float initializer ``fl32(q_w * s_w)`` through a per-channel ``Quant``
  (``scale`` shaped ``[C, 1, 1, 1]`` / ``[C, 1]``, which qonnx broadcasts; ``w_bits``, signed, not narrow:
  the integer model does not record a weight quantizer's ``narrow``, and the wider range holds every code),
  and the bias as a float initializer ``fl32(B * s_acc)``, feeding a float ``Conv`` / ``Gemm(transB=1)``;
* ``relu`` / ``add`` / ``sumpool`` / ``maxpool`` / ``flatten`` -> ``Relu`` / ``Add`` / ``GlobalAveragePool``
  or ``AveragePool`` / ``MaxPool`` / ``Flatten`` on the float values, exactly as the QDQ graph.

Graph input ``input`` (float image), output ``logits`` (float).  Each ``Quant``'s output tensor is named
``<value>:quant`` (``<layer>.weight:quant`` for weights), ``<value>`` being the integer model's value name.
With ``codes_outputs=True`` those tensors are also graph outputs.  They hold the *dequantized* values
``fl32(q * s)``, not the codes; ``q = round(y / s)`` recovers the code exactly (``|y/s - q| <= |q| 2^-24 <
1/2`` for any code below ``2^22``), which is simpler than ``Div`` / ``Round`` / ``Cast`` nodes in the graph.
:func:`check_qonnx` does this division itself and does not need the extra outputs (it reads every tensor
from the executor's full context).

**Division vs. reciprocal multiply.**  hwquant quantizes with ``round(x * fl32(1/s))``
(:mod:`hwquant.numerics.uniform`); QONNX's ``Quant`` divides, ``round(fl32(x / s))``.  For power-of-two
scales both are exact and equal.  For other scales they differ only where ``x / s`` lies within about an ulp
of a rounding tie: measured with four float32 scales (0.0111, 0.0219, 0.0234, 0.0312) on 4M normal values
each, 5 to 13 codes per 4M differ; on values at the half-step grid ``fl32((k + 1/2) s)`` 5% to 37% do.  In
this graph it can only matter at the input quantizer.  The later quantizers see float32 ``Conv`` / ``Add`` /
mean results, where the integer model requantizes the exact integer accumulator with a multiply-shift
``M / 2^n``, and that is the larger source of differences.  Measured on the tiny resnet20 of the tests
(1x12x12, 4 classes, min-max PTQ W8A8, float scales), 2 batches of 8 random-normal images, with the qonnx
executor and the numpy executor alike: the input quantizer's codes all agree (0 of 2304 differ) and so do
all weight codes (0 of 135312).  731 of 237824 activation codes differ, by at most 3 LSB, all in one batch,
starting from a single code at ``layer1.2.conv1.requant`` that then spreads down the network.  The logits
differ by up to 199 accumulator LSB (4.3e-4 absolute), and the top-1 agrees on every image.  The QDQ graph
in onnxruntime (:func:`hwquant.export.onnx.check_onnx`) and the fake-quant model
(:func:`hwquant.export.integer.compare`) show the same count, 731 codes (the QDQ graph's codes equal this
graph's, code for code), so this is float against integer requantization, not QONNX.  With power-of-two
scales (CQAT / STE ``pow2=True``) every float operation of the graph is exact, and the check finds 0
differing codes and 0 logit LSB difference.

:func:`check_qonnx` runs the graph with qonnx's executor (``ModelWrapper`` + ``execute_onnx``: node by
node, one onnxruntime session per standard node, so slow: keep batches small), or, when qonnx is not
installed (or ``executor="numpy"``), with the small numpy executor here, which implements ``Quant`` as qonnx
does (float32 divide, clamp, round half to even, rescale) and the standard ops with float64 sums rounded to
float32.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, HwquantError
from .integer import IntegerModel
from .onnx import OnnxGraph, need_onnx
from .tally import Tally, labelled_batches

__all__ = ["QONNX_DOMAIN", "check_qonnx", "qonnx_available", "run_numpy", "to_qonnx"]

OPSET = 13
QONNX_DOMAIN = "qonnx.custom_op.general"
_SUFFIX = ":quant"


def qonnx_available() -> bool:
    try:
        import qonnx.core.onnx_exec  # noqa: F401
    except ImportError:
        return False
    return True


def _int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """QONNX's ``min_int`` / ``max_int`` (unsigned ``narrow`` drops the top code)."""
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1 - int(narrow)


def _narrow(where: str, bits: int, signed: bool, qmin: int, qmax: int) -> bool:
    for narrow in (False, True):
        if _int_range(bits, signed, narrow) == (qmin, qmax):
            return narrow
    raise ConfigError(f"{where}: code range [{qmin}, {qmax}] is no {bits}-bit {'signed' if signed else 'unsigned'} "
                      "QONNX Quant range")


def to_qonnx(imodel: IntegerModel, path: str | os.PathLike, *, codes_outputs: bool = False,
             opset: int = OPSET) -> Path:
    """Write the QONNX graph of ``imodel`` to ``path`` (atomically) and return the path."""
    onnx = need_onnx("QONNX export")
    if not isinstance(imodel, IntegerModel):
        raise ConfigError("to_qonnx needs an IntegerModel (hwquant.export.integer_model)")
    if opset < 11:
        raise ConfigError(f"opset must be >= 11, got {opset}")
    g = OnnxGraph(onnx, opset)
    TP = onnx.TensorProto
    names: dict[str, str] = {}  # integer value name -> float tensor name
    shapes: dict[str, list] = {op.name: ["N", *op.shape[1:]] for op in imodel.ops}
    shapes[imodel.input_name] = ["N", *imodel.input_shape[1:]]

    def quant(src: str, name: str, scale: np.ndarray, bits: int, signed: bool, narrow: bool, shape: list,
              out: str | None = None) -> str:
        s = g.const(f"{name}.scale", np.asarray(scale, dtype=np.float32))
        z = g.const(f"{name}.zeropt", np.zeros((), dtype=np.float32))
        b = g.const(f"{name}.bitwidth", np.array(bits, dtype=np.float32))
        if out is not None:  # an inner stage (a bit window's 8-bit quantizer): not a value of the integer model
            g.nodes.append(g.h.make_node("Quant", [src, s, z, b], [out], name=g.uniq(f"{name}.Quant"),
                                         domain=QONNX_DOMAIN, signed=int(signed), narrow=0, rounding_mode="ROUND"))
            return out
        out = f"{name}{_SUFFIX}"
        g.nodes.append(g.h.make_node("Quant", [src, s, z, b], [out], name=g.uniq(f"{name}.Quant"),
                                     domain=QONNX_DOMAIN, signed=int(signed), narrow=int(narrow),
                                     rounding_mode="ROUND"))
        if codes_outputs:
            g.outputs.append(g.h.make_tensor_value_info(out, TP.FLOAT, shape))
        return out

    lo, hi = imodel.input_range
    iq = imodel.input_quant
    in_bits, in_signed = int(iq.spec.bits), bool(iq.signed)
    src_in = "input"
    if imodel.input_gain != 1.0:  # the host's gain (fold_input_gain): a float32 Mul, as the quantizer computes it
        src_in = g.uniq("input.gained")
        gain = g.const("input.gain", np.array(imodel.input_gain, dtype=np.float32))
        g.nodes.append(g.h.make_node("Mul", ["input", gain], [src_in], name=g.uniq("input.Mul")))
    names[imodel.input_name] = quant(src_in, imodel.input_name, np.array(float(imodel.input_scale)), in_bits,
                                     in_signed, _narrow("input", in_bits, in_signed, lo, hi),
                                     shapes[imodel.input_name])
    for op in imodel.ops:
        p = op.params
        ins = [names[i] for i in op.inputs]
        k = op.kind
        if k == "requant":
            bits, signed = int(p["bits"]), bool(p["signed"])
            narrow = _narrow(op.name, bits, signed, p["qmin"], p["qmax"])
            src = ins[0]
            if "clip_lo" in p:  # a carried clip (ReLU6 ...): per-channel code bounds before the Quant
                src = g.clip(src, p["clip_lo"].double() * p["out_scale"], p["clip_hi"].double() * p["out_scale"],
                             len(op.shape))
            if "window_shift" in p:  # a bit window: the 8-bit Quant, then the window's Quant at 2^shift its step
                src = quant(src, f"{op.name}.base", np.array(p["base_scale"]), int(p["base_bits"]), signed, False,
                            shapes[op.name], out=g.uniq(f"{op.name}.base8"))
            names[op.name] = quant(src, op.name, np.array(p["out_scale"]), bits, signed, narrow, shapes[op.name])
        elif k in ("conv2d", "linear"):
            w = p["weight"].numpy()
            bits = int(p["w_bits"])
            wlo, whi = _int_range(bits, True, False)
            if w.size and (int(w.min()) < wlo or int(w.max()) > whi):
                raise ConfigError(f"{op.name}: weight codes outside the {bits}-bit signed range")
            sw = p["w_scale"].numpy().astype(np.float32).reshape(-1)
            sw_b = sw.reshape((-1,) + (1,) * (w.ndim - 1)) if sw.size > 1 else sw.reshape(())
            w_f = (w.astype(np.float64) * sw_b.astype(np.float64)).astype(np.float32)  # fl32(q_w * s_w)
            wq = quant(g.const(f"{op.name}.weight", w_f), f"{op.name}.weight", sw_b, bits, True, False,
                       list(w.shape))
            inputs = [ins[0], wq]
            b = p.get("bias")
            if b is not None:
                s_acc = op.scale.numpy().astype(np.float32).astype(np.float64).reshape(-1)
                inputs.append(g.const(f"{op.name}.bias", (b.numpy().astype(np.float64) * s_acc).astype(np.float32)))
            names[op.name] = g.float_op(op, inputs, "QONNX")
        else:
            names[op.name] = g.float_op(op, ins, "QONNX")
    out_name = g.node("Identity", [names[imodel.output_name]], "logits")
    h = g.h
    return g.save(path, "hwquant_qonnx", [h.make_tensor_value_info("input", TP.FLOAT, shapes[imodel.input_name])],
                  [h.make_tensor_value_info(out_name, TP.FLOAT, shapes[imodel.output_name])],
                  [h.make_opsetid("", opset), h.make_opsetid(QONNX_DOMAIN, 1)], max_ir_version=8)


# ------------------------------------------------------------------------------------------ numpy executor
def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def _attrs(onnx, node) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _quant(x, scale, zeropt, bits, signed: bool, narrow: bool) -> np.ndarray:
    """QONNX ``Quant`` exactly as qonnx computes it (float32 divide, clamp, round half to even, rescale)."""
    lo, hi = _int_range(int(np.asarray(bits).item()), signed, narrow)
    y = _f32(x) / _f32(scale) + _f32(zeropt)
    y = np.round(np.clip(y, lo, hi))
    return _f32((y - _f32(zeropt)) * _f32(scale))


def _windows(x: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """``[N, C, OH, OW, KH, KW]`` strided view of a padded ``[N, C, H, W]`` array."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    st = x.strides
    return np.lib.stride_tricks.as_strided(x, (n, c, oh, ow, kh, kw),
                                           (st[0], st[1], st[2] * sh, st[3] * sw, st[2] * dh, st[3] * dw))


def _pad(x: np.ndarray, pads, value: float) -> np.ndarray:
    t, left, b, r = pads
    return np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=value)


def _conv(x, w, b, a) -> np.ndarray:
    kh, kw = w.shape[2:]
    pads = a.get("pads", [0, 0, 0, 0])
    xp = _pad(x.astype(np.float64), pads, 0.0)
    win = _windows(xp, (kh, kw), a.get("strides", [1, 1]), a.get("dilations", [1, 1]))
    groups = a.get("group", 1)
    n, c = x.shape[:2]
    cg, og = c // groups, w.shape[0] // groups
    outs = []
    for gi in range(groups):
        wg = w[gi * og:(gi + 1) * og].astype(np.float64)
        outs.append(np.einsum("ncyxij,ocij->noyx", win[:, gi * cg:(gi + 1) * cg], wg, optimize=True))
    y = np.concatenate(outs, axis=1)
    if b is not None:
        y = y + b.astype(np.float64).reshape(1, -1, 1, 1)
    return _f32(y)


def run_numpy(path_or_model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run a QONNX graph written by :func:`to_qonnx` in numpy; every tensor by name (the full context).

    Standard ops: ``Conv`` / ``Gemm`` / pools sum in float64 and round once to float32; ``Add`` / ``Relu`` in
    float32.  ``Quant`` as qonnx (see :func:`_quant`).
    """
    onnx = need_onnx("QONNX export")
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    from onnx import numpy_helper

    env: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env[model.graph.input[0].name] = _f32(x)
    for node in model.graph.node:
        a = _attrs(onnx, node)
        i = [env[n] if n else None for n in node.input]
        t = node.op_type
        if t == "Quant" and node.domain == QONNX_DOMAIN:
            if a.get("rounding_mode", "ROUND").upper() not in ("ROUND", "HALF_EVEN"):
                raise ConfigError(f"{node.name}: numpy executor supports rounding_mode ROUND only")
            y = _quant(*i[:4], bool(a.get("signed", 1)), bool(a.get("narrow", 0)))
        elif t == "Conv":
            y = _conv(i[0], i[1], i[2] if len(i) > 2 else None, a)
        elif t == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise ConfigError(f"{node.name}: numpy executor supports plain Gemm (transB) only")
            bm = i[1].astype(np.float64)
            y = i[0].astype(np.float64) @ (bm.T if a.get("transB", 0) else bm)
            if len(i) > 2 and i[2] is not None:
                y = y + i[2].astype(np.float64)
            y = _f32(y)
        elif t == "Relu":
            y = np.maximum(i[0], np.float32(0))
        elif t == "Add":
            y = _f32(i[0] + i[1])
        elif t == "Mul":  # the input gain: float32 times float32, correctly rounded as onnxruntime's
            y = (i[0].astype(np.float32) * i[1].astype(np.float32)).astype(np.float32)
        elif t == "Identity":
            y = i[0]
        elif t in ("Max", "Min"):
            y = (np.maximum if t == "Max" else np.minimum)(i[0], i[1]).astype(i[0].dtype)
        elif t == "Concat":
            y = np.concatenate(i, axis=a["axis"])
        elif t == "Resize":
            if a.get("mode") != "nearest":
                raise ConfigError(f"{node.name}: numpy executor supports nearest Resize only")
            sc = [int(v) for v in i[2]]
            y = i[0].repeat(sc[2], axis=2).repeat(sc[3], axis=3)
        elif t == "Div":
            y = _f32(_f32(i[0]) / _f32(i[1]))
        elif t == "Sub":
            y = _f32(_f32(i[0]) - _f32(i[1]))
        elif t == "Round":
            y = np.round(i[0])
        elif t == "Cast":
            y = i[0].astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
        elif t == "Gather":
            y = np.take(i[0], i[1], axis=a.get("axis", 0))
        elif t == "Flatten":
            ax = a.get("axis", 1)
            y = i[0].reshape(int(np.prod(i[0].shape[:ax])), -1)
        elif t == "GlobalAveragePool":
            y = _f32(i[0].astype(np.float64).mean(axis=(2, 3), keepdims=True))
        elif t in ("AveragePool", "MaxPool"):
            k = a["kernel_shape"]
            pads = a.get("pads", [0, 0, 0, 0])
            if a.get("ceil_mode", 0):
                raise ConfigError(f"{node.name}: numpy executor needs ceil_mode=0")
            if t == "AveragePool":
                if any(pads) and not a.get("count_include_pad", 0):
                    raise ConfigError(f"{node.name}: numpy executor needs count_include_pad=1")
                win = _windows(_pad(i[0].astype(np.float64), pads, 0.0), k, a.get("strides", [1, 1]), [1, 1])
                y = _f32(win.sum(axis=(4, 5)) / (k[0] * k[1]))
            else:
                win = _windows(_pad(i[0], pads, -np.inf), k, a.get("strides", [1, 1]), a.get("dilations", [1, 1]))
                y = win.max(axis=(4, 5))
        else:
            raise ConfigError(f"{node.name}: op {t!r} is not supported by the numpy executor")
        env[node.output[0]] = np.ascontiguousarray(y)
    return env


# --------------------------------------------------------------------------------------------- qonnx runner
def _qonnx_runner(model):
    """A function ``x -> full context`` running ``model`` with qonnx (batch dim fixed per batch size)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    cache: dict[int, Any] = {}

    def wrapper(n: int):
        if n not in cache:
            m = copy.deepcopy(model)
            for vi in [*m.graph.input, *m.graph.output]:
                dims = vi.type.tensor_type.shape.dim
                if dims and dims[0].dim_param:
                    dims[0].dim_value = n  # clears dim_param (oneof)
            del m.graph.value_info[:]
            cache[n] = ModelWrapper(m).transform(InferShapes())
        return cache[n]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        mw = wrapper(x.shape[0])
        return execute_onnx(mw, {mw.graph.input[0].name: _f32(x)}, return_full_exec_context=True)

    return run


def check_qonnx(path: str | os.PathLike, imodel: IntegerModel, batches, *, max_batches: int | None = None,
                executor: str = "auto") -> dict[str, Any]:
    """Run the QONNX file next to ``imodel`` and compare.

    ``executor``: ``"qonnx"`` (qonnx's ``execute_onnx``), ``"numpy"`` (:func:`run_numpy`) or ``"auto"`` (qonnx
    when importable, else numpy).  For every ``Quant`` (input, requantizations, weights) its codes
    ``round(y / scale)`` are compared with the integer model's value of the same name (input codes from
    :meth:`~hwquant.export.integer.IntegerModel.quantize_input`, weights with the layer's integer weights):
    ``layers`` maps each to ``codes`` / ``codes_diff`` / ``max_lsb``, with totals ``codes`` / ``codes_diff`` /
    ``max_code_lsb``, ``first_diff`` (the first quantizer in graph order with a differing code) and ``missing``
    (expected quantizers absent from the file).  ``max_logit_lsb`` is the largest ``|logits / s_out - V_out|``
    (``max_logit_abs`` the same in float units), ``prediction_agree`` the top-1 agreement in percent,
    ``top1_qonnx`` / ``top1_integer`` the accuracies on labelled batches.  ``executor`` says which ran.  The
    file may be written with or without ``codes_outputs``.

    Raises:
        HwquantError: onnx is not installed, or ``executor="qonnx"`` without qonnx.
    """
    onnx = need_onnx("QONNX export")
    if executor not in ("auto", "qonnx", "numpy"):
        raise ConfigError(f"executor must be auto, qonnx or numpy, got {executor!r}")
    if executor == "auto":
        executor = "qonnx" if qonnx_available() else "numpy"
    elif executor == "qonnx" and not qonnx_available():
        raise HwquantError("executor='qonnx' needs the qonnx package: pip install qonnx")
    model = onnx.load(str(path))
    run = _qonnx_runner(model) if executor == "qonnx" else (lambda x: run_numpy(model, x))
    quants = {}  # value name -> (output tensor, scale initializer name)
    for node in model.graph.node:
        if node.op_type == "Quant" and node.output[0].endswith(_SUFFIX):
            quants[node.output[0][: -len(_SUFFIX)]] = (node.output[0], node.input[1])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {f"{op.name}.weight": op.params["weight"].numpy() for op in imodel.ops if op.kind in ("conv2d", "linear")}
    expected = [imodel.input_name, *(op.name for op in imodel.ops if op.kind == "requant"), *weights]
    missing = [n for n in expected if n not in quants]
    s_out = imodel.output_scale.double()
    s = s_out.reshape(1, -1) if s_out.numel() > 1 else s_out.reshape(())
    tally = Tally()
    for name in expected:  # the table's order is the graph's order (first_diff)
        if name not in missing:
            tally.layers[name] = {"codes": 0, "codes_diff": 0, "max_lsb": 0}
    max_lsb, max_abs = 0.0, 0.0
    for x, y in labelled_batches(batches, max_batches):
        ctx = run(x.float().contiguous().numpy())
        env = imodel.trace(imodel.quantize_input(x))
        for name in tally.layers:
            out, sname = quants[name]
            codes = np.round(ctx[out].astype(np.float64) / inits[sname].astype(np.float64)).astype(np.int64)
            tally.codes(name, codes, weights[name] if name in weights else env[name])
        v = env[imodel.output_name].double()
        logits = torch.from_numpy(np.asarray(ctx["logits"])).double()
        max_lsb = max(max_lsb, float((logits / s - v).abs().max()))
        max_abs = max(max_abs, float((logits - v * s).abs().max()))
        tally.predictions(v * s, logits, y)
    t = tally.totals()
    return {"executor": executor, "images": tally.images, "max_logit_lsb": max_lsb, "max_logit_abs": max_abs,
            "first_diff": t["first_diff"], "top1_qonnx": tally.top1("other"),
            "top1_integer": tally.top1("reference"), "prediction_agree": tally.prediction_agree,
            "codes": t["codes"], "codes_diff": t["codes_diff"], "max_code_lsb": t["max_code_lsb"],
            "quant_nodes": len(quants), "missing": missing, "nodes": len(model.graph.node), "layers": tally.layers}

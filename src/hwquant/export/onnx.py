"""ONNX export: a QDQ graph written with ``onnx.helper`` from the integer model, checked in onnxruntime.

``torch.onnx.export`` maps ``fake_quantize_*`` to QuantizeLinear/DequantizeLinear only for the code ranges
(0, 255), (-128, 127) and (0, 127), so the graph is built here from the
:class:`~hwquant.export.integer.IntegerModel`, one ONNX node group per integer op:

* every ``requant`` -> ``QuantizeLinear(scale, zero point 0)`` -> ``DequantizeLinear``, in ``UINT8`` / ``INT8``
  (``UINT16`` / ``INT16`` above 8 bits).  Activation codes of 4 bits and fewer also ride in 8-bit types by
  default: onnxruntime 1.32's CPU session with its default (all) optimizations rejects a 4-bit activation
  tensor (its QDQ propagation moves a ``UINT4`` QuantizeLinear in front of ``MaxPool``, and its QLinearConv
  fusion refuses ``UINT4`` inputs), while the values are the same in either type.  ``int4_activations=True``
  writes them as ``UINT4`` / ``INT4`` at opset 21 (such a file needs ``optimize="basic"``).  Weights, which
  the file stores, use ``INT4`` at opset 21 whenever their codes fit (onnxruntime runs that by default).
  Codes narrower than their type (CQAT's 5-bit weights ride in ``INT8``; a 4-bit activation in ``UINT8``) get
  a ``Clip`` at ``q_max * s`` before the quantizer, so the stored codes keep their range.  The input quantizer
  is the first of them (after a ``Mul`` by the input gain where the first layer has one, see
  :func:`~hwquant.nn.fold.fold_input_gain`).  A bit-window requantization (CQAT ``step="window"``,
  :mod:`hwquant.numerics.window`) is two: ``QuantizeLinear(d8)`` to the 8-bit code, ``DequantizeLinear(1)``
  (the code as an exact float), ``Clip`` to the window's range times ``2^shift``, ``QuantizeLinear(2^shift)``
  (the shifter: an exact division rounded half to even) and ``DequantizeLinear`` at the effective step
  ``2^shift * d8``.
* ``conv2d`` / ``linear`` -> ``DequantizeLinear(int weights, per-channel scale, axis 0)`` and, for the bias,
  ``DequantizeLinear(int32 bias, s_x * s_w, axis 0)``, feeding a float ``Conv`` / ``Gemm``: the QDQ pattern
  onnxruntime fuses into ``QLinearConv`` / ``QGemm`` where the types allow.  Weight codes beyond +-64 (8-bit
  weights) are stored as ``UINT8`` ``w + 128`` with zero point 128, the same integers: onnxruntime's fused
  uint8 x int8 kernels on x86 CPUs without VNNI (AVX2) saturate the 16-bit sum of two products
  (``2 * 255 * 127 > 2^15``), and its uint8 x uint8 kernels do not.
* ``relu`` / ``add`` / ``sumpool`` / ``maxpool`` / ``flatten`` / ``concat`` / ``upsample`` -> ``Relu`` / ``Add`` /
  ``GlobalAveragePool`` or ``AveragePool`` / ``MaxPool`` / ``Flatten`` / ``Concat`` / ``Resize`` (nearest) on the
  dequantized values; ``clamp`` and a requantization's carried clip -> ``Max`` / ``Min`` with per-channel
  bounds; ``lut`` -> ``Gather`` from the table of dequantized outputs at index ``round(x / s_in) - q_min``.

The graph input is the float image, the output the float logits.  With ``codes_outputs=True`` every
quantizer's integer codes are extra outputs (``<name>:codes``, read back through a ``Cast`` to int32 so int4
outputs are easy to consume), for :func:`check_onnx`'s per-layer comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, HwquantError
from .integer import IntegerModel
from .tally import Tally, labelled_batches

__all__ = ["check_onnx", "onnx_available", "to_onnx"]

OPSET = 21
# onnxruntime's u8s8 int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of uint8 x int8 products
# in 16 bits with saturation (vpmaddubsw): 2 * 255 * |w| must stay below 2^15, i.e. |w| <= 64.  Wider weight
# codes are written as uint8 with zero point 128 (its u8u8 kernels widen first), see to_onnx.
_U8S8_SAFE = 64


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def need_onnx(what: str = "ONNX export"):
    try:
        import onnx
    except ImportError:
        raise HwquantError(f"{what} needs the onnx package: pip install 'hwquant[onnx]'") from None
    return onnx


def _qtype(onnx, qmin: int, qmax: int, opset: int, int4: bool = True):
    """ONNX tensor type holding ``[qmin, qmax]`` and whether a Clip is needed to keep the range."""
    TP = onnx.TensorProto
    signed = qmin < 0
    options = [((-8, 7), TP.INT4), ((0, 15), TP.UINT4)] if opset >= 21 and int4 else []
    options += [((-128, 127), TP.INT8), ((0, 255), TP.UINT8), ((-32768, 32767), TP.INT16), ((0, 65535), TP.UINT16)]
    for (lo, hi), t in options:
        if (lo < 0) == signed and lo <= qmin and qmax <= hi:
            return t, (lo, hi) != (qmin, qmax)
    raise ConfigError(f"codes [{qmin}, {qmax}] fit no ONNX integer type")


def _np_type(onnx, t):
    return onnx.helper.tensor_dtype_to_np_dtype(t)


class OnnxGraph:
    """An ONNX graph under construction: nodes, initializers (named uniquely) and extra outputs; shared by the
    QDQ export here and the QONNX export (:mod:`hwquant.export.qonnx`)."""

    def __init__(self, onnx, opset: int):
        self.onnx = onnx
        self.h = onnx.helper
        self.nodes: list = []
        self.inits: list = []
        self.outputs: list = []
        self.opset = opset
        self.n = 0

    def save(self, path: str | os.PathLike, graph_name: str, inputs: list, outputs: list, opsets: list,
             max_ir_version: int) -> Path:
        """Make the model of this graph, check it with ``onnx.checker`` and write it to ``path`` atomically (a
        temp file in the same directory, renamed: an interrupted export leaves no partial file)."""
        from ..fileio import atomic_write

        h = self.h
        graph = h.make_graph(self.nodes, graph_name, inputs, [*outputs, *self.outputs], self.inits)
        model = h.make_model(graph, opset_imports=opsets, producer_name="hwquant")
        model.ir_version = min(model.ir_version, max_ir_version)
        self.onnx.checker.check_model(model)
        return atomic_write(path, lambda tmp: self.onnx.save(model, tmp))

    def uniq(self, base: str) -> str:
        self.n += 1
        return f"{base}__{self.n}"

    def const(self, name: str, arr: np.ndarray, dtype=None) -> str:
        name = self.uniq(name)
        if dtype is not None and dtype in (self.onnx.TensorProto.INT4, self.onnx.TensorProto.UINT4):
            t = self.h.make_tensor(name, dtype, list(arr.shape), arr.astype(np.int64).reshape(-1).tolist())
        elif dtype is not None:
            t = self.onnx.numpy_helper.from_array(np.asarray(arr).astype(_np_type(self.onnx, dtype)), name)
        else:
            t = self.onnx.numpy_helper.from_array(np.asarray(arr), name)
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.uniq(op.lower())
        self.nodes.append(self.h.make_node(op, inputs, [out], name=self.uniq(op), **attrs))
        return out

    def zp(self, dtype, shape=()) -> str:
        return self.const("zp", np.zeros(shape, dtype=np.int64), dtype)

    def float_op(self, op, ins: list[str], fmt: str = "ONNX") -> str:
        """The float ONNX node of an integer-model op that is not a quantizer (conv / linear take ``ins`` =
        ``[x, w, (b)]``, already dequantized); returns the output name (``identity``: its input)."""
        k, p = op.kind, op.params
        if k == "conv2d":
            return self.node("Conv", ins, strides=list(p["stride"]), pads=list(p["padding"]) * 2,
                             dilations=list(p["dilation"]), group=p["groups"])
        if k == "linear":
            return self.node("Gemm", ins, transB=1)
        if k == "relu":
            return self.node("Relu", ins)
        if k == "add":
            return self.node("Add", ins)
        if k == "sumpool" and p.get("global"):
            return self.node("GlobalAveragePool", ins)
        if k == "sumpool":
            return self.node("AveragePool", ins, kernel_shape=list(p["kernel_size"]), strides=list(p["stride"]),
                             pads=list(p["padding"]) * 2, count_include_pad=1)
        if k == "maxpool":
            return self.node("MaxPool", ins, kernel_shape=list(p["kernel_size"]), strides=list(p["stride"]),
                             pads=list(p["padding"]) * 2, dilations=list(p["dilation"]))
        if k == "flatten":
            return self.node("Flatten", ins, axis=1)
        if k == "identity":
            return ins[0]
        if k == "clamp":
            s = op.scale.double().reshape(-1)
            return self.clip(ins[0], p["lo"].double() * s, p["hi"].double() * s, len(op.shape))
        if k == "concat":
            return self.node("Concat", ins, axis=p["dim"])
        if k == "upsample":
            scales = self.const("scales", np.array([1.0, 1.0, *p["factor"]], dtype=np.float32))
            return self.node("Resize", [ins[0], "", scales], mode="nearest",
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        if k == "lut":
            # the input is the dequantized code fl32(q * s_in): q = round(x / s_in) exactly (|q| < 2^22), and
            # the table holds the dequantized outputs fl32(LUT[q - q_min] * s_out)
            q = self.node("Round", [self.node("Div", [ins[0], self.const("lut.s_in", np.float32(p["in_scale"]))])])
            idx = self.node("Cast", [self.node("Sub", [q, self.const("lut.qmin", np.float32(p["offset"]))])],
                            to=self.onnx.TensorProto.INT64)
            table = (p["table"].double() * p["out_scale"]).float().numpy()
            return self.node("Gather", [self.const(f"{op.name}.table", table), idx], axis=0)
        raise ConfigError(f"{op.name}: op {k!r} has no {fmt} form")

    def clip(self, src: str, lo: torch.Tensor, hi: torch.Tensor, rank: int) -> str:
        """``Min(Max(src, lo), hi)`` with bounds per channel (dim 1) or scalar, as float32 constants."""
        def shaped(v: torch.Tensor) -> np.ndarray:
            a = v.float().numpy().reshape(-1)
            return a.reshape((1, -1) + (1,) * (rank - 2)) if a.size > 1 else a.reshape(())

        lo_c = self.const("clip.lo", shaped(lo))
        return self.node("Min", [self.node("Max", [src, lo_c]), self.const("clip.hi", shaped(hi))])


def to_onnx(model, path: str | os.PathLike, example_input: torch.Tensor | None = None, *, opset: int = OPSET,
            codes_outputs: bool = False, int4_activations: bool = False) -> Path:
    """Write the QDQ ONNX graph to ``path`` (atomically) and return the path.

    ``model`` is an :class:`IntegerModel`, or a fake-quantized model together with ``example_input`` (then its
    integer model is built first).
    """
    onnx = need_onnx()
    if isinstance(model, IntegerModel):
        imodel = model
    else:
        if example_input is None:
            raise ConfigError("to_onnx needs example_input to export a fake-quantized model")
        from .integer import integer_model

        imodel = integer_model(model, example_input)
    if opset < 13:
        raise ConfigError(f"opset must be >= 13 (per-channel DequantizeLinear), got {opset}")
    g = OnnxGraph(onnx, opset)
    TP = onnx.TensorProto
    names: dict[str, str] = {}  # integer value name -> float ONNX tensor name (the dequantized value)
    x_in = "input"

    shapes = {op.name: ["N", *op.shape[1:]] for op in imodel.ops}
    shapes[imodel.input_name] = ["N", *imodel.input_shape[1:]]

    def quant(src: str, name: str, scale: float, qmin: int, qmax: int, params=None) -> str:
        t, clip = _qtype(onnx, qmin, qmax, opset, int4=int4_activations)
        if params is not None and "clip_lo" in params:  # a carried clip: per-channel code bounds
            src = g.clip(src, params["clip_lo"].double() * scale, params["clip_hi"].double() * scale,
                         len(shapes[name]))
        if params is not None and "window_shift" in params:
            # a bit window (numerics.window): the 8-bit quantizer, its codes as exact floats (scale 1), the
            # shifter as a QuantizeLinear with step 2^shift (c8 / 2^shift is exact, rounded half to even) after
            # a Clip that keeps the window's range, then the value at the effective step
            t8, _ = _qtype(onnx, params["base_qmin"], params["base_qmax"], opset, int4=False)
            q8 = g.node("QuantizeLinear", [src, g.const(f"{name}.base_scale",
                                                          np.array(params["base_scale"], dtype=np.float32)),
                                           g.zp(t8)])
            src = g.node("DequantizeLinear", [q8, g.const("one", np.array(1.0, dtype=np.float32)), g.zp(t8)])
            k = 2.0 ** params["window_shift"]
            qt = _qtype(onnx, qmin, qmax, opset, int4=int4_activations)[0]
            src = g.node("Clip", [src, g.const(f"{name}.wlo", np.array(qmin * k, dtype=np.float32)),
                                  g.const(f"{name}.whi", np.array(qmax * k, dtype=np.float32))])
            q = g.node("QuantizeLinear", [src, g.const(f"{name}.window", np.array(k, dtype=np.float32)), g.zp(qt)],
                       f"{name}:q")
            if codes_outputs:
                c = g.node("Cast", [q], f"{name}:codes", to=TP.INT32)
                g.outputs.append(g.h.make_tensor_value_info(c, TP.INT32, shapes[name]))
            return g.node("DequantizeLinear", [q, g.const(f"{name}.scale", np.array(scale, dtype=np.float32)),
                                               g.zp(qt)])
        s = g.const(f"{name}.scale", np.array(scale, dtype=np.float32))
        if clip:
            lo = g.const(f"{name}.lo", np.array(qmin * scale, dtype=np.float32))
            hi = g.const(f"{name}.hi", np.array(qmax * scale, dtype=np.float32))
            src = g.node("Clip", [src, lo, hi])
        q = g.node("QuantizeLinear", [src, s, g.zp(t)], f"{name}:q")
        if codes_outputs:
            c = g.node("Cast", [q], f"{name}:codes", to=TP.INT32)
            g.outputs.append(g.h.make_tensor_value_info(c, TP.INT32, shapes[name]))
        return g.node("DequantizeLinear", [q, s, g.zp(t)])

    iq_lo, iq_hi = imodel.input_range
    src_in = x_in
    if imodel.input_gain != 1.0:  # the host's gain (fold_input_gain): a float32 Mul, as the quantizer computes it
        src_in = g.node("Mul", [x_in, g.const("input.gain", np.array(imodel.input_gain, dtype=np.float32))])
    names[imodel.input_name] = quant(src_in, imodel.input_name, float(imodel.input_scale), iq_lo, iq_hi)
    for op in imodel.ops:
        p = op.params
        ins = [names[i] for i in op.inputs]
        k = op.kind
        if k == "requant":  # after a sum pool the float graph has already averaged (GlobalAveragePool)
            names[op.name] = quant(ins[0], op.name, p["out_scale"], p["qmin"], p["qmax"], p)
        elif k in ("conv2d", "linear"):
            w = p["weight"].numpy()
            wt, _ = _qtype(onnx, int(w.min()) if w.size else 0, int(w.max()) if w.size else 0, opset)
            if wt in (TP.UINT4, TP.UINT8, TP.UINT16):  # weights are signed codes
                wt = {TP.UINT4: TP.INT4, TP.UINT8: TP.INT8, TP.UINT16: TP.INT16}[wt]
                if opset < 21 and wt == TP.INT4:
                    wt = TP.INT8
            sw = p["w_scale"].numpy().astype(np.float32).reshape(-1)
            axis_attr = {"axis": 0} if sw.size > 1 else {}
            zshape = (sw.size,) if sw.size > 1 else ()
            if wt == TP.INT8 and w.size and int(np.abs(w).max()) > _U8S8_SAFE:
                # UINT8 codes w + 128 with zero point 128: the same integers, but onnxruntime's fused u8u8
                # kernels widen to 16 bits, where its u8s8 ones (x86 without VNNI) saturate 16-bit pair sums
                wq = g.const(f"{op.name}.weight", w.astype(np.int64) + 128, TP.UINT8)
                zp = g.const("zp", np.full(zshape, 128, dtype=np.int64), TP.UINT8)
            else:
                wq = g.const(f"{op.name}.weight", w, wt)
                zp = g.zp(wt, zshape)
            wdq = g.node("DequantizeLinear", [wq, g.const(f"{op.name}.w_scale", sw if sw.size > 1 else sw[0]), zp],
                         **axis_attr)
            inputs = [ins[0], wdq]
            b = p.get("bias")
            if b is not None:
                s_acc = op.scale.numpy().astype(np.float32).reshape(-1)
                bi = b.numpy()
                if bi.size and not (bi.min() >= -(2**31) and bi.max() < 2**31):
                    # a float constant here would silently leave the integer datapath: refuse, naming the layer
                    need = int(max(abs(int(bi.min())), abs(int(bi.max())))).bit_length() + 1
                    raise ConfigError(f"{op.name}: the bias needs {need}-bit codes in accumulator units "
                                      f"(s_x * s_w = {float(s_acc.min()):.3g}), beyond ONNX's int32 bias; "
                                      "the layer's input or weight step is degenerate")
                bq = g.const(f"{op.name}.bias", bi.astype(np.int32))
                bdq = g.node("DequantizeLinear", [bq, g.const(f"{op.name}.b_scale", s_acc),
                                                  g.zp(TP.INT32, (s_acc.size,))], axis=0)
                inputs.append(bdq)
            names[op.name] = g.float_op(op, inputs)
        else:
            names[op.name] = g.float_op(op, ins)
    out_name = g.node("Identity", [names[imodel.output_name]], "logits")
    h = g.h
    shape = ["N", *imodel.input_shape[1:]]
    return g.save(path, "hwquant_qdq", [h.make_tensor_value_info(x_in, TP.FLOAT, shape)],
                  [h.make_tensor_value_info(out_name, TP.FLOAT, shapes[imodel.output_name])],
                  [h.make_opsetid("", opset)], max_ir_version=10)


def _has_int4(model) -> bool:
    import onnx

    int4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    # a 4-bit QuantizeLinear (its zero point's type): int4 activations; int4 weights alone run with "all"
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and inits.get(n.input[2]) in int4
               for n in model.graph.node)


def session(path: str | os.PathLike, optimize: str = "auto"):
    """An onnxruntime CPU session for ``path`` and the optimization level used.

    ``optimize="auto"``: every graph optimization (onnxruntime's default; QDQ -> QLinearConv fusion), which is
    what :func:`to_onnx` writes for; ``"basic"`` only for files written with ``int4_activations=True``, because
    onnxruntime 1.32's extended QDQ passes reject 4-bit activation tensors (a UINT4 QuantizeLinear moved in
    front of MaxPool, or fused into a QLinearConv).  ``"all"`` / ``"basic"`` / ``"none"`` force it.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise HwquantError("checking ONNX needs onnxruntime: pip install 'hwquant[onnx]'") from None
    onnx = need_onnx()
    if optimize == "auto":
        optimize = "basic" if _has_int4(onnx.load(str(path))) else "all"
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimize not in levels:
        raise ConfigError(f"optimize must be auto, all, basic or none, got {optimize!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimize]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), optimize


def fused_ops(path: str | os.PathLike, optimize: str = "auto") -> dict[str, int]:
    """Op-type counts of the graph onnxruntime actually runs (after its optimizations)."""
    import tempfile

    import onnxruntime as ort

    onnx = need_onnx()
    sess_level = session(path, optimize)[1]
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[sess_level]
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for n in onnx.load(so.optimized_model_filepath).graph.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def check_onnx(path: str | os.PathLike, imodel: IntegerModel, batches, *, max_batches: int | None = None,
               optimize: str = "auto") -> dict[str, Any]:
    """Run the ONNX file in onnxruntime (CPU) next to ``imodel`` and compare.

    The file must have been written with ``codes_outputs=True``.  Returns per-quantizer code differences
    (count and largest, in LSB), the logits' largest difference in output LSB, and both top-1s.
    """
    sess, level = session(path, optimize)
    outs = [o.name for o in sess.get_outputs()]
    code_outs = [o for o in outs if o.endswith(":codes")]
    s_out = imodel.output_scale.double()
    tally = Tally()
    max_logit_lsb = 0.0
    for x, y in labelled_batches(batches, max_batches):
        res = dict(zip(outs, sess.run(outs, {"input": x.float().contiguous().numpy()}), strict=True))
        env = imodel.trace(imodel.quantize_input(x))
        for o in code_outs:
            name = o[: -len(":codes")]
            tally.codes(name, res[o], env[name] if name in env else imodel.quantize_input(x))
        v = env[imodel.output_name].double()
        logits = torch.from_numpy(res["logits"]).double()
        max_logit_lsb = max(max_logit_lsb, float(((logits / s_out.reshape(1, -1)) - v).abs().max()))
        tally.predictions(v.mul(s_out.reshape(1, -1)), logits, y)
    t = tally.totals()
    stats = {"images": tally.images, "codes": t["codes"], "codes_diff": t["codes_diff"],
             "max_code_lsb": t["max_code_lsb"], "first_diff": t["first_diff"], "max_logit_lsb": max_logit_lsb,
             "top1_onnx": tally.top1("other"), "top1_integer": tally.top1("reference"),
             "agree": tally.prediction_agree, "layers": tally.layers}
    stats["nodes"] = len(need_onnx().load(str(path)).graph.node)
    stats["optimize"] = level
    return stats

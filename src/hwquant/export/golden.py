"""Golden vectors for RTL: every layer's integer inputs, parameters and outputs as ``$readmemh`` files.

:func:`write_golden` runs an :class:`~hwquant.export.integer.IntegerModel` on a few inputs and writes, into one
directory:

* ``manifest.json``: format ``hwquant-golden-1``; the input (file, shape, bits, sign, scale, and ``gain``:
  the host's codes are ``rne(fl32(x * gain) / scale)`` from the float image ``x``) and, in execution
  order, every operation with its kind, inputs, output file, shape and bit width, and its parameters:
  requantization multiplier / shift / divisor and code range (and per-channel ``clip_lo`` / ``clip_hi`` code
  bounds where a ReLU6 / clamp saturates there); conv stride / padding / dilation / groups; add multipliers;
  pool windows; clamp bounds; concat dim; upsampling factors; weight, bias and lookup-table (``lut``: the
  ``2^b`` output codes of an activation, a ROM image) files with their bit widths; the output scale.
* one ``<name>.hex`` per tensor: one value per line, two's complement in ``ceil(bits / 4)`` hex digits, in
  row-major (``N, C, H, W`` / ``out, in, kh, kw``) order: what Verilog's ``$readmemh`` loads.

:func:`replay` recomputes every operation **from the files alone** with numpy ``int64`` (its own im2col
convolution, shift and division rounding; no torch) and :func:`verify` checks each recomputed tensor against
its golden file (layer by layer, each op fed the golden inputs) and end to end.  A malformed manifest or a
file that does not match it raises :class:`GoldenError` naming the problem.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HwquantError
from .integer import IntegerModel

__all__ = ["FORMAT", "GoldenError", "read_hex", "replay", "verify", "write_golden", "write_hex"]

FORMAT = "hwquant-golden-1"
_KINDS = ("requant", "conv2d", "linear", "relu", "add", "sumpool", "maxpool", "flatten", "identity", "clamp", "concat",
          "upsample", "lut")


class GoldenError(HwquantError):
    """A golden-vector directory is missing, malformed, or does not match its manifest."""


# ------------------------------------------------------------------------------------------------- hex files
def _digits(bits: int) -> int:
    return max(1, math.ceil(bits / 4))


def write_hex(path: Path, values: np.ndarray, bits: int) -> None:
    """``values`` (integers) as ``bits``-bit two's complement hex, one per line."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        raise GoldenError(f"{path.name}: values do not fit {bits}-bit two's complement")
    mask = (1 << bits) - 1
    d = _digits(bits)
    u = v.astype(object) & mask if bits >= 63 else (v & mask)
    text = "\n".join(f"{int(x):0{d}x}" for x in u)
    path.write_text(text + ("\n" if v.size else ""))


def read_hex(path: Path, bits: int, count: int | None = None) -> np.ndarray:
    """The values of a :func:`write_hex` file, sign-extended from ``bits`` bits (int64)."""
    if not path.is_file():
        raise GoldenError(f"missing golden file {path}")
    try:
        words = [int(w, 16) for w in path.read_text().split()]
    except ValueError:
        raise GoldenError(f"{path.name}: not a hex file") from None
    if count is not None and len(words) != count:
        raise GoldenError(f"{path.name}: {len(words)} values, the manifest says {count}")
    if any(w >> bits for w in words):
        raise GoldenError(f"{path.name}: a value is wider than {bits} bits")
    sign = 1 << (bits - 1)
    return np.array([(w ^ sign) - sign for w in words], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- write
def _bits_of(t: torch.Tensor) -> int:
    m = int(t.abs().max()) if t.numel() else 0
    return max(2, m.bit_length() + 1)


def _tolist(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


def write_golden(imodel: IntegerModel, x: torch.Tensor, out_dir: str | os.PathLike) -> Path:
    """Run ``imodel`` on the float batch ``x`` and write the golden directory ``out_dir`` (replaced
    atomically: written to a temporary sibling, then renamed).  Returns the manifest path."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        codes = imodel.quantize_input(x)
        env = imodel.trace(codes)
        lo, hi = imodel.input_range
        in_bits = max(2, max(-lo, hi).bit_length() + 1)
        files: dict[str, str] = {}

        def tensor_file(name: str, t: torch.Tensor, bits: int) -> dict[str, Any]:
            fname = f"{name}.hex"
            if fname in files.values():
                raise GoldenError(f"two tensors would share the file {fname}")
            write_hex(tmp / fname, t.numpy(), bits)
            files[name] = fname
            return {"file": fname, "shape": list(t.shape), "bits": bits}

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "input": {"name": imodel.input_name, **tensor_file(imodel.input_name, codes, in_bits),
                      "qmin": lo, "qmax": hi, "scale": float(imodel.input_scale), "gain": imodel.input_gain},
            "ops": [],
            "output": imodel.output_name,
            "output_scale": imodel.output_scale.reshape(-1).tolist(),
        }
        for op in imodel.ops:
            val = env[op.name]
            entry: dict[str, Any] = {"kind": op.kind, "name": op.name, "inputs": list(op.inputs),
                                     "output": tensor_file(op.name, val, max(op.bits, _bits_of(val)))}
            for key, v in op.params.items():
                if key in ("float64_exact", "factor_f64"):  # an evaluation shortcut of IntOp.run, not hardware
                    continue
                if key == "weight":
                    entry["weight"] = tensor_file(f"{op.name}.weight", v, _bits_of(v))
                elif key == "bias":
                    if v is not None:
                        entry["bias"] = tensor_file(f"{op.name}.bias", v, _bits_of(v))
                elif key == "table":
                    entry["table"] = tensor_file(f"{op.name}.table", v, _bits_of(v))
                elif key in ("w_scale",):
                    entry[key] = _tolist(v.reshape(-1))
                else:
                    entry[key] = _tolist(v)
            entry["scale"] = op.scale.reshape(-1).tolist() if op.scale is not None else None
            manifest["ops"].append(entry)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.json"


# ---------------------------------------------------------------------------------------- manifest checking
def _need(d: dict, key: str, where: str, types) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise GoldenError(f"manifest: {where} lacks '{key}'")
    v = d[key]
    if not isinstance(v, types) or isinstance(v, bool) and types is not bool:
        raise GoldenError(f"manifest: {where}.{key} has the wrong type ({type(v).__name__})")
    return v


def _tensor_spec(d: Any, where: str) -> tuple[str, list[int], int]:
    if not isinstance(d, dict):
        raise GoldenError(f"manifest: {where} must be an object with file, shape, bits")
    f = _need(d, "file", where, str)
    shape = _need(d, "shape", where, list)
    bits = _need(d, "bits", where, int)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise GoldenError(f"manifest: {where}.shape must be a list of non-negative integers")
    if not 2 <= bits <= 64:
        raise GoldenError(f"manifest: {where}.bits must be in 2..64, got {bits}")
    if "/" in f or "\\" in f or f.startswith("."):
        raise GoldenError(f"manifest: {where}.file must be a plain file name, got {f!r}")
    return f, shape, bits


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``root/manifest.json`` (structure, kinds, input names); raises :class:`GoldenError`."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise GoldenError(f"no manifest.json in {root}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GoldenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise GoldenError(f"{path}: format must be {FORMAT!r}")
    inp = _need(m, "input", "top level", dict)
    _tensor_spec(inp, "input")
    _need(inp, "name", "input", str)
    ops = _need(m, "ops", "top level", list)
    _need(m, "output", "top level", str)
    names = {inp["name"]}
    for i, op in enumerate(ops):
        where = f"ops[{i}]"
        kind = _need(op, "kind", where, str)
        if kind not in _KINDS:
            raise GoldenError(f"manifest: {where}.kind {kind!r} is not one of {', '.join(_KINDS)}")
        name = _need(op, "name", where, str)
        where = f"op {name!r}"
        ins = _need(op, "inputs", where, list)
        for n in ins:
            if n not in names:
                raise GoldenError(f"manifest: {where} reads {n!r}, which no earlier op produces")
        _tensor_spec(op.get("output"), f"{where}.output")
        if kind in ("conv2d", "linear"):
            _tensor_spec(op.get("weight"), f"{where}.weight")
            if "bias" in op:
                _tensor_spec(op["bias"], f"{where}.bias")
        if kind == "requant":
            for key in ("multiplier", "shift"):
                _need(op, key, where, list)
            for key in ("qmin", "qmax", "divisor"):
                _need(op, key, where, int)
        if kind == "conv2d":
            for key in ("stride", "padding", "dilation"):
                _need(op, key, where, list)
            _need(op, "groups", where, int)
        if kind == "add":
            _need(op, "k_a", where, list)
            _need(op, "k_b", where, list)
        if kind == "clamp":
            _need(op, "lo", where, list)
            _need(op, "hi", where, list)
        if kind == "concat":
            _need(op, "dim", where, int)
        if kind == "upsample":
            _need(op, "factor", where, list)
        if kind == "lut":
            _tensor_spec(op.get("table"), f"{where}.table")
            _need(op, "offset", where, int)
        names.add(name)
    if m["output"] not in names:
        raise GoldenError(f"manifest: output {m['output']!r} is not produced by any op")
    return m


def _load(root: Path, spec: dict[str, Any]) -> np.ndarray:
    f, shape, bits = _tensor_spec(spec, spec.get("file", "?"))
    n = int(np.prod(shape)) if shape else 1
    return read_hex(root / f, bits, n).reshape(shape)


# ----------------------------------------------------------------------------------------- numpy reference
def _shift_rne(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    f = p >> n
    r = p - (f << n)
    h = np.where(n > 0, np.left_shift(np.ones_like(n), np.maximum(n - 1, 0)), 0)
    up = (r > h) | ((r == h) & (h > 0) & ((f & 1) == 1))
    return f + up


def _div_rne(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    f = np.floor_divide(a, b)
    r2 = 2 * (a - f * b)
    up = (r2 > b) | ((r2 == b) & ((f & 1) == 1))
    return f + up


def _chan(v: list, ndim: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.int64)
    return a.reshape((1, -1) + (1,) * (ndim - 2)) if a.size > 1 else a.reshape(())


def _conv2d(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dh, dw = dilation
    sh, sw = stride
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    oh = (h + 2 * ph - eh) // sh + 1
    ow = (wd + 2 * pw - ew) // sw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    win = win[:, :, :oh, :ow]  # n, c, oh, ow, kh, kw
    og = o // groups
    outs = []
    for g in range(groups):
        xs = win[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        outs.append(np.einsum("ncijkl,ockl->noij", xs, ws, dtype=np.int64, optimize=True))
    return np.concatenate(outs, axis=1)


def _run_op(op: dict[str, Any], xs: list[np.ndarray], root: Path) -> np.ndarray:
    k = op["kind"]
    if k == "requant":
        (v,) = xs
        m, n, d = _chan(op["multiplier"], v.ndim), _chan(op["shift"], v.ndim), int(op["divisor"])
        q = _shift_rne(v * m, n) if d == 1 else _div_rne(v * m, np.left_shift(np.int64(d), n))
        q = np.clip(q, op["qmin"], op["qmax"])
        if "clip_lo" in op:
            q = np.minimum(np.maximum(q, _chan(op["clip_lo"], q.ndim)), _chan(op["clip_hi"], q.ndim))
        return q
    if k in ("conv2d", "linear"):
        (x,) = xs
        w = _load(root, op["weight"])
        if k == "conv2d":
            acc = _conv2d(x, w, op["stride"], op["padding"], op["dilation"], op["groups"])
        else:
            acc = x @ w.T
        if "bias" in op:
            b = _load(root, op["bias"])
            acc = acc + b.reshape((1, -1) + (1,) * (acc.ndim - 2))
        return acc
    if k == "relu":
        return np.maximum(xs[0], 0)
    if k == "add":
        a, b = xs
        return a * _chan(op["k_a"], a.ndim) + b * _chan(op["k_b"], b.ndim)
    if k == "sumpool":
        (x,) = xs
        if op.get("global"):
            return x.sum(axis=(2, 3), keepdims=True)
        kh, kw = op["kernel_size"]
        sh, sw = op["stride"]
        ph, pw = op["padding"]
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        return win.sum(axis=(4, 5))
    if k == "maxpool":
        (x,) = xs
        kh, kw = op["kernel_size"]
        sh, sw = op["stride"]
        ph, pw = op["padding"]
        dh, dw = op["dilation"]
        low = np.iinfo(np.int64).min
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=low)
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        return win.max(axis=(4, 5))
    if k == "flatten":
        return xs[0].reshape(xs[0].shape[0], -1)
    if k == "identity":
        return xs[0]
    if k == "clamp":
        return np.minimum(np.maximum(xs[0], _chan(op["lo"], xs[0].ndim)), _chan(op["hi"], xs[0].ndim))
    if k == "concat":
        return np.concatenate(xs, axis=op["dim"])
    if k == "upsample":
        sh, sw = op["factor"]
        return xs[0].repeat(sh, axis=2).repeat(sw, axis=3)
    if k == "lut":
        return _load(root, op["table"])[xs[0] - op["offset"]]
    raise GoldenError(f"manifest: unknown op kind {k!r}")


def replay(root: str | os.PathLike, *, from_golden_inputs: bool = False) -> dict[str, np.ndarray]:
    """Recompute every operation of the golden directory ``root`` with numpy, from the files alone.

    ``from_golden_inputs``: feed each op the *golden files* of its inputs (layer-by-layer check) instead of
    the values recomputed upstream (end-to-end).
    """
    root = Path(root)
    m = load_manifest(root)
    env = {m["input"]["name"]: _load(root, m["input"])}
    golden: dict[str, np.ndarray] = {}
    for op in m["ops"]:
        if from_golden_inputs:
            xs = [golden[i] if i in golden else env[i] for i in op["inputs"]]
        else:
            xs = [env[i] for i in op["inputs"]]
        env[op["name"]] = _run_op(op, xs, root)
        if from_golden_inputs:
            golden[op["name"]] = _load(root, op["output"])
    return env


def verify(root: str | os.PathLike) -> dict[str, Any]:
    """Replay ``root`` both ways and compare with every golden output file.

    Returns ``{"ops", "values", "mismatches": [names], "ok"}``; ``ok`` is True when every recomputed tensor
    equals its file exactly, layer by layer and end to end.
    """
    root = Path(root)
    m = load_manifest(root)
    end_to_end = replay(root)
    layerwise = replay(root, from_golden_inputs=True)
    bad = []
    values = 0
    for op in m["ops"]:
        g = _load(root, op["output"])
        values += g.size
        for env in (end_to_end, layerwise):
            r = env[op["name"]]
            if r.shape != g.shape or not np.array_equal(r, g):
                bad.append(op["name"])
                break
    return {"ops": len(m["ops"]), "values": values, "mismatches": bad, "ok": not bad}

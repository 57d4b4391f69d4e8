"""Throughput of fake quantization on large fp32 tensors: hwquant vs torch vs a plain copy.

What is measured (8-bit signed, per tensor, fixed scale, zero point 0, under ``torch.no_grad()``):

* ``copy``: ``dst.copy_(x)`` into a preallocated buffer, the memory-bandwidth floor (read 4 B + write 4 B
  per element, no allocation);
* ``clone``: ``x.clone()``, the same traffic plus allocating (and page-faulting) a fresh output, which
  every out-of-place op below also pays;
* ``torch``: ``torch.fake_quantize_per_tensor_affine`` (the reference, one fused kernel, nearest);
* ``hwquant <mode>``: :func:`hwquant.numerics.fake_quantize` with each rounding mode (``stochastic`` with
  a seeded ``torch.Generator``);
* ``hwquant quantize``: :func:`hwquant.numerics.quantize` (int8 codes, nearest): reads 4 B, writes 1 B.

GB/s counts the bytes an ideal single pass moves (8 B/element for fp32 in + fp32 out, 5 B for int8 codes),
so it is comparable to the copy's bandwidth.  ``x copy`` and ``x torch`` are **ratios measured in the
same run**: every op is timed in interleaved rounds and the ratio is the median over rounds of
``t_op / t_ref`` (see :mod:`benchmarks.common`), which cancels most of a shared machine's noise.

A second table times forward + backward (``requires_grad`` input, upstream gradient given) of hwquant's
nearest fake quantization against torch's, on the 16M tensor (4M in quick mode).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch

from hwquant.numerics import fake_quantize, quantize

from .common import loadavg, markdown_table, paired_ratio, time_interleaved, write_results

NAME = "quantizer"
BITS, QMIN, QMAX = 8, -128, 127
# A float32-exact scale (not a power of two) for which randn data clips beyond about +-3 sigma.
SCALE = float(torch.tensor(3.0 / 127, dtype=torch.float32))
MODES = ("nearest", "zero", "floor", "stochastic")

FULL_SIZES = (1 << 20, 16 << 20, 64 << 20)
QUICK_SIZES = (1 << 20, 4 << 20)
FULL_GRAD_SIZE, QUICK_GRAD_SIZE = 16 << 20, 4 << 20


def _label(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


def _timing_plan(n: int, quick: bool) -> dict[str, Any]:
    """Repeats per size: more rounds (and looped calls) for the short 1M ops, fewer for 64M."""
    if quick:
        return {"repeats": 5, "warmup": 1, "min_time": 0.005}
    if n <= 1 << 20:
        return {"repeats": 15, "warmup": 2, "min_time": 0.02}
    return {"repeats": 15 if n <= 16 << 20 else 7, "warmup": 2, "min_time": 0.0}


def _ops(x: torch.Tensor, dst: torch.Tensor, scale_t: torch.Tensor, gen: torch.Generator) -> dict[str, tuple]:
    """``name -> (callable, ideal bytes per element)`` for the no-grad throughput table."""
    ops: dict[str, tuple] = {
        "copy": (lambda: dst.copy_(x), 8),
        "clone": (lambda: x.clone(), 8),
        "torch": (lambda: torch.fake_quantize_per_tensor_affine(x, SCALE, 0, QMIN, QMAX), 8),
    }
    for mode in MODES:
        g = gen if mode == "stochastic" else None
        ops[f"hwquant {mode}"] = (
            lambda mode=mode, g=g: fake_quantize(x, scale_t, BITS, True, mode, generator=g),
            8,
        )
    ops["hwquant quantize (int8 codes)"] = (lambda: quantize(x, scale_t, BITS, True, "nearest"), 5)
    return ops


def _throughput(n: int, quick: bool, gen: torch.Generator) -> tuple[list[dict[str, Any]], bool]:
    scale_t = torch.tensor(SCALE, dtype=torch.float32)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    dst = torch.empty_like(x)
    with torch.no_grad():
        # Correctness guard: the timed ops must compute the same thing (nearest is bit-exact vs torch).
        ref = torch.fake_quantize_per_tensor_affine(x, SCALE, 0, QMIN, QMAX)
        matches = bool(torch.equal(fake_quantize(x, scale_t, BITS, True, "nearest"), ref))
        del ref
        ops = _ops(x, dst, scale_t, gen)
        stats = time_interleaved({k: fn for k, (fn, _) in ops.items()}, **_timing_plan(n, quick))
    rows = []
    for op, (_, bpe) in ops.items():
        st = stats[op]
        rows.append(
            {
                "size": _label(n),
                "elements": n,
                "op": op,
                "median_ms": st["median_s"] * 1e3,
                "min_ms": st["min_s"] * 1e3,
                "bytes_per_element": bpe,
                "gbps": bpe * n / st["median_s"] / 1e9,
                "x_copy": paired_ratio(st, stats["copy"]),
                "x_torch": paired_ratio(st, stats["torch"]),
                "repeats": len(st["runs"]),
                "loops": st["loops"],
            }
        )
    del x, dst, ops, stats  # free the big tensors before the next size
    gc.collect()
    return rows, matches


def _forward_backward(n: int, quick: bool) -> list[dict[str, Any]]:
    scale_t = torch.tensor(SCALE, dtype=torch.float32)
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(2))

    def hw() -> None:
        x.grad = None
        fake_quantize(x, scale_t, BITS, True, "nearest").backward(grad_out)

    def ref() -> None:
        x.grad = None
        torch.fake_quantize_per_tensor_affine(x, SCALE, 0, QMIN, QMAX).backward(grad_out)

    plan = {"repeats": 5, "warmup": 1} if quick else {"repeats": 15, "warmup": 2}
    stats = time_interleaved({"torch fwd+bwd": ref, "hwquant nearest fwd+bwd": hw}, **plan)
    rows = [
        {
            "size": _label(n),
            "elements": n,
            "op": op,
            "median_ms": st["median_s"] * 1e3,
            "min_ms": st["min_s"] * 1e3,
            "x_torch": paired_ratio(st, stats["torch fwd+bwd"]),
            "repeats": len(st["runs"]),
        }
        for op, st in stats.items()
    ]
    return rows


def measure(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns ``{"config", "throughput": [rows], "forward_backward": [rows]}``."""
    load_before = loadavg()
    sizes = QUICK_SIZES if quick else FULL_SIZES
    gen = torch.Generator().manual_seed(0)
    throughput, matches = [], {}
    for n in sizes:
        rows, ok = _throughput(n, quick, gen)
        throughput += rows
        matches[_label(n)] = ok
    grad_n = QUICK_GRAD_SIZE if quick else FULL_GRAD_SIZE
    return {
        "config": {
            "quick": quick,
            "loadavg_before": load_before,
            "bits": BITS,
            "signed": True,
            "granularity": "tensor",
            "scale": SCALE,
            "zero_point": 0,
            "dtype": "float32",
            "sizes": [_label(n) for n in sizes],
            "forward_backward_size": _label(grad_n),
            "ratio_method": "median over interleaved rounds of t_op / t_ref",
        },
        "nearest_matches_torch": matches,
        "throughput": throughput,
        "forward_backward": _forward_backward(grad_n, quick),
    }


def table(results: dict[str, Any]) -> str:
    """Markdown for the results: throughput table, then the forward+backward table."""
    cfg = results["config"]
    t1 = markdown_table(
        results["throughput"],
        [
            ("size", "elements"),
            ("op", "op"),
            ("median_ms", "median ms"),
            ("min_ms", "min ms"),
            ("gbps", "GB/s"),
            ("x_copy", "x copy"),
            ("x_torch", "x torch"),
        ],
    )
    t2 = markdown_table(
        results["forward_backward"],
        [
            ("size", "elements"),
            ("op", "op"),
            ("median_ms", "median ms"),
            ("min_ms", "min ms"),
            ("x_torch", "x torch"),
        ],
    )
    match = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results["nearest_matches_torch"].items())
    return "\n".join(
        [
            f"8-bit signed per-tensor fake quantization of fp32 tensors, scale {cfg['scale']:.6g}, "
            "under `torch.no_grad()`.",
            "GB/s = ideal bytes moved (8 B/element fp32 in+out; 5 B for int8 codes) / median time.",
            "`x copy` / `x torch`: median over interleaved rounds of t_op / t_ref (same run).",
            f"hwquant nearest output equals torch's bit for bit: {match}.",
            "`clone` = the copy plus a freshly allocated output: for large tensors the allocator maps new",
            "pages on every call and page-faults them, a cost every out-of-place op (torch's included) pays.",
            f"Load average (1/5/15 min) before the run: {cfg['loadavg_before']}.",
            "",
            t1,
            "",
            f"## Forward + backward ({cfg['forward_backward_size']} elements, `requires_grad` input)",
            "",
            t2,
        ]
    )


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    """Measure, write ``quantizer.{json,md}`` and return ``{"results", "table", "json", "md"}``."""
    results = measure(quick)
    md = table(results)
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}

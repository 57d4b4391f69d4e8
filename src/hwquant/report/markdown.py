"""Markdown tables and the demo report."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], digits: int = 2) -> str:
    """A GitHub Markdown table: ``columns`` is ``[(key, header), ...]``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), digits) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_demo_report(out: str | Path, result: dict[str, Any]) -> Path:
    """Write ``report.md`` and ``accuracy.png`` for a :func:`hwquant.commands.demo.run_demo` result; returns the
    report path."""
    from .plots import demo_figure

    out = Path(out)
    demo_figure(result, out / "accuracy.png")
    fp32 = result["rows"][0]["top1"]
    rows = [dict(r, drop=None if i == 0 else fp32 - r["top1"]) for i, r in enumerate(result["rows"])]
    e = result["export"]
    lines = [
        f"# hwquant demo: {result['model']} on {result['dataset']}",
        "",
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{result['checkpoint']}`"
        f" (data: {result.get('source')}) in {result['wall_seconds']:.0f} s.",
    ]
    if result.get("fallback_message"):
        lines += ["", f"> **Note:** {result['fallback_message']}"]
    lines += [
        "",
        "## Accuracy and hardware cost",
        "",
        markdown_table(rows, [("row", "model"), ("top1", "top-1 %"), ("drop", "drop vs FP32 (pt)"),
                              ("start_top1", "QAT start top-1 %"), ("sqnr_db", "logit SQNR (dB)"),
                              ("w_bits_mean", "mean W bits"), ("stored_kib", "stored KiB"),
                              ("compression", "compression x"), ("energy_uj", "energy uJ/image"),
                              ("seconds", "seconds")]),
        "",
        "Test top-1 on the whole test set; calibration on a split held out of the training set. First conv and",
        "last FC at 8 bits in the 4/5-bit rows; fixed point = power-of-two steps, requantization by shifts.",
        "Stored bits and energy per image: `hwquant.hw` cost model (16x16 PEs of 2-bit bricks, 128 KiB",
        "activation buffer, 45 nm energies of Horowitz, ISSCC 2014); `hwquant cost --checkpoint ...` per layer.",
        "",
        "![accuracy against stored size](accuracy.png)",
        "",
        f"## Integer export of {e['row']}",
        "",
        f"* integer model (int64 accumulators, up to {e['acc_bits_max']} bits used) vs the fake-quant model on "
        f"{e['images']} test images: **{e['codes_diff']} of {e['codes']} layer-input codes differ** "
        f"(max {e['max_code_lsb']} LSB); top-1 fake quant {e['top1_fake_quant']:.2f} %, integer "
        f"{e['top1_integer']:.2f} %;",
        f"* `{e['onnx']}` in onnxruntime (graph optimizations: {e['onnx_optimize']}"
        f"{', the default' if e['onnx_optimize'] == 'all' else ''}): **{e['onnx_codes_diff']} codes "
        f"differ** from the integer model (max {e['onnx_max_code_lsb']} LSB); top-1 {e['top1_onnx']:.2f} %;",
        f"* golden vectors `{e['golden']}`: numpy replay {'matches every file' if e['golden_ok'] else 'MISMATCH'}.",
        "",
        f"Per-layer SQNR, sensitivity, histograms and accumulator widths: `{result['report_html']}`"
        + (f" (most sensitive layer: `{result['most_sensitive_layer']}`)." if result.get("most_sensitive_layer")
           else "."),
    ]
    hist = result.get("history") or []
    if hist:
        lines += ["", "## FP32 training", "",
                  markdown_table(hist, [("epoch", "epoch"), ("train_loss", "train loss"),
                                        ("train_top1", "train top-1 %"), ("test_top1", "test top-1 %"),
                                        ("seconds", "seconds")])]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

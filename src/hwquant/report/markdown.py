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
    """Write ``report.md`` and ``accuracy.png`` for a demo result; returns the report path."""
    from .plots import demo_figure

    out = Path(out)
    demo_figure(result, out / "accuracy.png")
    fp32 = result["rows"][0]["top1"]
    rows = [dict(r, drop=(fp32 - r["top1"]) if r["w_bits"] < 32 else None) for r in result["rows"]]
    lines = [
        f"# hwquant demo: {result['model']} on {result['dataset']}",
        "",
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{result['checkpoint']}`"
        f" (data: {result.get('source')}).",
    ]
    if result.get("fallback_message"):
        lines += ["", f"> **Note:** {result['fallback_message']}"]
    lines += [
        "",
        "## Test accuracy",
        "",
        markdown_table(rows, [("precision", "precision"), ("top1", "top-1 %"), ("top5", "top-5 %"),
                              ("drop", "drop vs FP32 (pt)"), ("sqnr_db", "logit SQNR (dB)"),
                              ("stored_kib", "stored KiB"), ("compression", "compression x"),
                              ("energy_uj", "energy uJ/image")]),
        "",
        "Stored bits and energy per image: `hwquant.hw` cost model (16x16 PEs of 2-bit bricks, 128 KiB",
        "activation buffer, 45 nm energies of Horowitz, ISSCC 2014); `hwquant cost --checkpoint ...` per layer.",
        "",
        "Weights: signed, symmetric, per output channel; activations: per tensor, unsigned after ReLU;",
        "biases int32 at the accumulator scale; BatchNorm folded into the convolutions first.",
        "Calibration uses a split held out of the training set, never the test set.",
        "",
        "![accuracy and training curve](accuracy.png)",
    ]
    hist = result.get("history") or []
    if hist:
        lines += ["", "## FP32 training", "",
                  markdown_table(hist, [("epoch", "epoch"), ("train_loss", "train loss"),
                                        ("train_top1", "train top-1 %"), ("test_top1", "test top-1 %"),
                                        ("seconds", "seconds")])]
    for bits, layers in (result.get("layers") or {}).items():
        lines += ["", f"## Per-layer view, INT{bits}", "",
                  markdown_table(layers, [("layer", "layer"), ("w_bits", "w bits"), ("w_sqnr_db", "weight SQNR dB"),
                                          ("a_bits", "a bits"), ("a_signed", "a signed"), ("a_scale", "a scale")],
                                 digits=4)]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

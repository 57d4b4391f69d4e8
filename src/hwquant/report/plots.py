"""Plot helpers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from ..fileio import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def demo_figure(result: dict, path: str | Path) -> Path:
    """Left: test top-1 against stored size (KiB, log scale), one point per row.  Right: the FP32 training loss
    per step and test top-1 per epoch."""
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    colors = {"FP32": "#4c72b0", "min-max": "#c44e52", "GGD": "#55a868", "CQAT": "#8172b2", "FP32 control": "#937860",
              "ARC": "#dd8452"}
    markers = {"W8A8": "s", "W4A4": "o", "W5A4": "D", "G8": "^"}
    for r in rows:
        kind = next((k for k in ("FP32 control", "min-max", "GGD", "CQAT", "ARC") if r["row"].startswith(k)), "FP32")
        mark = next((m for w, m in markers.items() if w in r["row"]), "*")
        ax1.scatter(r["stored_kib"], r["top1"], s=60 if mark != "*" else 120, color=colors[kind], marker=mark,
                    zorder=3, label=r["row"], edgecolors="black", linewidths=0.4)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    ax1.set_xscale("log")
    ax1.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax1.set_xlabel("stored size (KiB: weight codes, index, biases, scales; log scale)")
    ax1.set_ylabel("test top-1 (%)")
    ax1.set_title(f"{result['model']} on {result['dataset']}")
    ax1.grid(True, which="both", alpha=0.3)
    steps = result.get("step_loss") or []
    if steps:
        ax2.plot([s[0] for s in steps], [s[1] for s in steps], lw=1, label="train loss (10-step mean)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("loss")
        ax2.set_yscale("log")
    hist = result.get("history") or []
    if hist and "test_top1" in hist[0]:
        ax3 = ax2.twinx()
        spe = steps[-1][0] / len(hist) if steps else 1
        ax3.plot([h["epoch"] * spe for h in hist], [h["test_top1"] for h in hist], "o-", color="#c44e52",
                 label="test top-1")
        ax3.set_ylabel("test top-1 (%)")
    ax2.set_title("FP32 training")
    return save_figure(fig, path)

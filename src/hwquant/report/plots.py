"""Plot helpers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..fileio import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def demo_figure(result: dict, path: str | Path) -> Path:
    """Left: test top-1 per precision (bars).  Right: training loss per step and test top-1 per epoch."""
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [r["precision"].split(" ")[0] for r in rows]
    vals = [r["top1"] for r in rows]
    bars = ax1.bar(labels, vals, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974"][: len(rows)])
    for b, v in zip(bars, vals, strict=True):
        ax1.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", fontsize=9)
    ax1.set_ylim(0, 105)
    ax1.set_ylabel("test top-1 (%)")
    ax1.set_title(f"{result['model']} on {result['dataset']}: min-max PTQ")
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

"""``hwquant report``: the HTML / Markdown report of a run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import check_output_dir, doc, set_threads


@dataclass(frozen=True)
class ReportOptions:
    """``hwquant report RUN_DIR``: one HTML page (self-contained) and Markdown for a train / ptq / qat run: accuracy
    and cost, per-layer SQNR and sensitivity (one layer quantized at a time, and all but one), activation
    histograms with the quantizer's clip, bits per layer, QAT loss, MPQ flips, ARC clips, accumulator widths."""

    run_dir: str = field(default="runs/ptq", metadata=doc("run directory (holding model.pt)"))
    out: str | None = field(default=None, metadata=doc("output directory (default: RUN_DIR/report)"))
    images: int = field(default=256, metadata=doc("held-out calibration images for the per-layer measurements"))
    batch_size: int = field(default=128, metadata=doc("batch size"))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (default: as in the checkpoint)"))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads"))

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ConfigError(f"images must be >= 1, got {self.images}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def run_report(cfg: ReportOptions) -> dict[str, Any]:
    """Build and write the report of a run directory (see :mod:`hwquant.report.run_report`)."""
    from ..report.run_report import build_report, write_report

    set_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "report"
    check_output_dir(out)
    report, plots = build_report(cfg.run_dir, images=cfg.images, batch_size=cfg.batch_size, data_dir=cfg.data_dir)
    paths = write_report(report, plots, out)
    sens = report["sensitivity"]
    worst = f"; most sensitive layer {sens[0]['layer']}" if sens else ""
    print(f"report of {cfg.run_dir}{worst} -> {paths['html']}")
    return {"report": report, "paths": {k: str(v) for k, v in paths.items()}}

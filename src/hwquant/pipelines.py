"""The commands behind the CLI as library functions, in one namespace (kept for code written against it).

Each command lives in its own module of :mod:`hwquant.commands` (options class, run function, printing):
``train``, ``ptq``, ``qat``, ``eval``, ``export``, ``cost``, ``report`` and ``demo``; what they share (output
directories, checkpoints and their data splits, the ARC options) is :mod:`hwquant.commands.common`.  Each run
function takes a validated options dataclass, writes its outputs atomically under ``cfg.out`` (with the resolved
``config.yaml`` beside them), and returns a JSON-serialisable result dict.
"""

from __future__ import annotations

from .commands.common import (
    DATASETS,
    DEVICE_HELP,
    GradQuantOptions,
    arc_config,
    check_output_dir,
    checkpoint_loaders,
    load_model,
    resumable,
    set_threads,
)
from .commands.cost import CostOptions, run_cost
from .commands.eval import EvalOptions, run_eval
from .commands.export import EXPORT_FORMATS, ExportOptions, run_export
from .commands.ptq import PTQ_METHODS, PTQOptions, quantize_checkpoint, run_ptq
from .commands.qat import QAT_METHODS, QATOptions, run_qat
from .commands.report import ReportOptions, run_report
from .commands.train import TrainOptions, run_train

__all__ = [
    "DATASETS",
    "DEVICE_HELP",
    "EXPORT_FORMATS",
    "PTQ_METHODS",
    "QAT_METHODS",
    "CostOptions",
    "EvalOptions",
    "ExportOptions",
    "GradQuantOptions",
    "PTQOptions",
    "QATOptions",
    "ReportOptions",
    "TrainOptions",
    "arc_config",
    "check_output_dir",
    "checkpoint_loaders",
    "load_model",
    "quantize_checkpoint",
    "resumable",
    "run_cost",
    "run_eval",
    "run_export",
    "run_ptq",
    "run_qat",
    "run_report",
    "run_train",
    "set_threads",
]

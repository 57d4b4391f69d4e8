"""``hwquant`` command line: parse -> validated config -> library call.

Every option can come from a YAML file (``--config configs/demo.yaml``); flags given on the command
line override it.  Every command takes ``--device auto|cpu|cuda``.  User errors print one line and exit with
status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import config as cfgmod
from .errors import HwquantError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (options class, runner) as "module:name" under hwquant, resolved lazily so `hwquant --help` stays fast
    "demo": ("commands.demo:DemoOptions", "commands.demo:run_demo"),
    "train": ("commands.train:TrainOptions", "commands.train:run_train"),
    "ptq": ("commands.ptq:PTQOptions", "commands.ptq:run_ptq"),
    "qat": ("commands.qat:QATOptions", "commands.qat:run_qat"),
    "eval": ("commands.eval:EvalOptions", "commands.eval:run_eval"),
    "export": ("commands.export:ExportOptions", "commands.export:run_export"),
    "cost": ("commands.cost:CostOptions", "commands.cost:run_cost"),
    "report": ("commands.report:ReportOptions", "commands.report:run_report"),
}

HELP = {
    "demo": "FP32, min-max vs GGD PTQ at W8A8 / W4A4, CQAT W5A4 vs its control, bit-exact export, cost, report",
    "train": "train a float model, built in or your own (--model FILE.py:Class), resumable, torchrun-aware",
    "ptq": "post-training quantization of a trained checkpoint, or of your own model (--model, --weights)",
    "qat": "quantization-aware fine-tuning of a trained checkpoint (CQAT, STE, PACT, LSQ)",
    "eval": "evaluate a float or quantized checkpoint",
    "export": "integer model, golden vectors, ONNX or RTL rounding units (each checked bit for bit)",
    "cost": "bits stored, compression ratio, BOPs, cycles and energy on a reconfigurable PE array",
    "report": "one HTML page per run: accuracy, cost, per-layer SQNR and sensitivity, histograms, bit widths",
}


POSITIONAL = {"report": "run_dir"}  # commands whose main option may also be given positionally


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too by default)
        self.exit(2, f"{self.prog}: error: {message}\n")


def resolve(name: str) -> Any:
    """An options class or runner of :data:`COMMANDS`: ``"module:name"`` in ``hwquant.module``."""
    import importlib

    module, _, attr = name.rpartition(":")
    return getattr(importlib.import_module(f"hwquant.{module}"), attr)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hwquant", description="Hardware-friendly quantization of CNNs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (cls_name, _) in COMMANDS.items():
        cls = resolve(cls_name)
        p = sub.add_parser(name, help=HELP[name], description=(cls.__doc__ or "").strip())
        p.add_argument("--config", metavar="YAML", help="read options from this YAML file (flags override it)")
        if name in POSITIONAL:
            key = POSITIONAL[name]
            p.add_argument(f"{key}_pos", nargs="?", metavar=key.upper(), help=f"same as --{key.replace('_', '-')}")
        cfgmod.add_arguments(p, cls)
    return parser


def run(argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` and run the command; raises HwquantError on user error."""
    args = build_parser().parse_args(argv)
    cls_name, fn_name = COMMANDS[args.command]
    cls = resolve(cls_name)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if args.command in POSITIONAL:  # `hwquant report RUN_DIR`: the positional form of one option
        key = POSITIONAL[args.command]
        pos = flags.pop(f"{key}_pos")
        if pos is not None:
            flags[key] = pos
    yaml_values = cfgmod.load_yaml(args.config) if args.config else {}
    cfg = cfgmod.resolve(cls, yaml_values, flags, source=args.config or "config")
    runner: Callable[[Any], Any] = resolve(fn_name)
    return runner(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed in one line
        return e.code if isinstance(e.code, int) else 2
    except HwquantError as e:
        print(f"hwquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwquant: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

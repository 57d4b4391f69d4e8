"""Run the hwquant benchmarks: ``python -m benchmarks.run [names...] [--quick] [--results-dir DIR]``.

Each registered benchmark is a module with ``main(quick: bool, out_dir=None) -> dict`` that measures,
writes ``<results dir>/<name>.json`` and ``.md`` and returns ``{"results", "table", "json", "md"}``.
The results directory is ``--results-dir``, else ``$HWQUANT_BENCH_RESULTS``, else ``benchmarks/results``.
``--quick`` shrinks sizes and repeats so everything finishes in well under a minute (smoke test).

Numbers from a shared, noisy CPU machine are only meaningful as ratios within one run; every benchmark
interleaves its contenders and reports medians (see :mod:`benchmarks.common`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

REGISTRY: dict[str, str] = {
    "quantizer": "benchmarks.quantizer",
    "train_step": "benchmarks.train_step",
    "ptq": "benchmarks.ptq",
    "qat": "benchmarks.qat",
    "ggd_fit": "benchmarks.ggd_fit",
    "bft": "benchmarks.bft",
    "rtl": "benchmarks.rtl",
    "export": "benchmarks.export",
    "arc": "benchmarks.arc",
    "cost": "benchmarks.cost",
    "mpq": "benchmarks.mpq",
    "mobilenet": "benchmarks.mobilenet",
    "demo": "benchmarks.demo",
    "report": "benchmarks.report",
    "distributed": "benchmarks.distributed",
    "pow2_step": "benchmarks.pow2_step",
}


def get_benchmark(name: str):
    """The module registered under ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def run(
    names: list[str] | None = None,
    *,
    quick: bool = False,
    out_dir: str | os.PathLike | Path | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run ``names`` (default: all registered) and return ``{name: main(...)'s dict}``."""
    names = list(names or REGISTRY)
    mods = {name: get_benchmark(name) for name in names}  # fail fast on a bad name or setting
    for mod in mods.values():
        if hasattr(mod, "check_settings"):
            mod.check_settings()
    out: dict[str, dict[str, Any]] = {}
    for name, mod in mods.items():
        t0 = time.perf_counter()
        res = mod.main(quick=quick, out_dir=out_dir)
        res["wall_s"] = time.perf_counter() - t0
        out[name] = res
        if verbose:
            print(f"# {name} ({res['wall_s']:.1f} s) -> {res['md']}\n\n{res['table']}\n", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(REGISTRY)})")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 60 s in all)")
    p.add_argument("--results-dir", default=None, help="where to write <name>.json/.md")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    from .common import SettingError

    try:
        run(args.names, quick=args.quick, out_dir=args.results_dir)
    except SettingError as e:  # a bad HWQUANT_* setting: one line, nothing run
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

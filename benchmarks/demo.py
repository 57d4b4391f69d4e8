"""The demo as the README shows it: ``hwquant demo`` (``configs/demo.yaml``'s settings), its rows, export checks
and wall time, copied from the run's ``results.json`` into ``benchmarks/results/demo.{json,md}``.

``HWQUANT_DEMO_FRESH=1`` trains the FP32 model into an empty cache first (the "from nothing" budget of a
fresh clone, 16 minutes on two cores); otherwise the cached checkpoint of ``runs/cache`` is used (trained
there if missing) and the wall time is the "cached" one (10 minutes).  Run directories: ``runs/bench_demo``.
Quick mode: ``hwquant demo --quick`` (digits).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .common import markdown_table, write_results

NAME = "demo"


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    fp32 = rows[0]["top1"]
    out = [dict(r, drop=None if i == 0 else fp32 - r["top1"]) for i, r in enumerate(rows)]
    e = results["export"]
    md = markdown_table(out, [("row", "model"), ("top1", "top-1 %"), ("drop", "drop vs FP32 (pt)"),
                              ("start_top1", "QAT start top-1 %"), ("w_bits_mean", "mean W bits"),
                              ("stored_kib", "stored KiB"), ("compression", "compression x"),
                              ("energy_uj", "energy uJ/image"), ("seconds", "seconds")])
    exp = markdown_table([e], [("row", "exported"), ("images", "test images"), ("codes_diff", "codes differ int vs FQ"),
                               ("codes", "codes compared"), ("onnx_codes_diff", "ORT codes differ vs int"),
                               ("onnx_optimize", "ORT graph optimizations"), ("golden_ok", "golden replay"),
                               ("top1_integer", "top-1 integer %"), ("acc_bits_max", "acc bits")])
    wall = results["wall_seconds"]
    if results["trained_now"]:
        start = (f"trained from nothing (empty cache): wall time {wall / 60:.1f} min, of which FP32 training and "
                 f"evaluation {rows[0]['seconds'] / 60:.1f} min, so {(wall - rows[0]['seconds']) / 60:.1f} min with "
                 "the checkpoint cached")
    else:
        start = f"FP32 checkpoint cached: wall time {wall / 60:.1f} min"
        t = results.get("fp32_train_seconds")
        if t:
            start += (f"; the cached FP32 training took {t / 60:.1f} min when it was made, so about "
                      f"{(wall + t) / 60:.1f} min from nothing")
    return (f"{md}\n\n{exp}\n\n`hwquant demo` ({results['model']} on {results['dataset']}), {start}. Most "
            f"sensitive layer in the report of the exported model: `{results['most_sensitive_layer']}`.\n")


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.commands.demo import DemoOptions, run_demo

    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs"))
    fresh = os.environ.get("HWQUANT_DEMO_FRESH") == "1"
    tmp = tempfile.mkdtemp(prefix="hwquant-demo-cache-") if fresh or quick else None
    try:
        cache = tmp or "runs/cache"
        out = runs / ("bench_demo_quick" if quick else "bench_demo")
        if out.exists():
            shutil.rmtree(out)  # every row is remade: the wall time is the demo's
        res = run_demo(DemoOptions(quick=quick, out=str(out), cache=cache, progress=False))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {k: v for k, v in res.items() if k not in ("history", "step_loss")}
    metrics = Path(res["checkpoint"]).parent / "metrics.json"
    if not res["trained_now"] and metrics.exists():  # the cache's own record of its training time
        import json

        res["fp32_train_seconds"] = json.loads(metrics.read_text()).get("train_seconds")
    md = table(res)
    jp, mp = write_results(NAME, res, md, out_dir=out_dir)
    return {"results": res, "table": md, "json": str(jp), "md": str(mp)}

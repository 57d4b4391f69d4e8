"""CQAT W5A4 with power-of-two steps: the MSE step rounded to a power of two (``round``) against the MSE-best
power of two (``search``), in the demo's short fine-tune, two seeds.

Rows: ``hwquant qat --method cqat --w-bits 5 --a-bits 4 --pow2 --pow2-step {round,search} --epochs 1
--steps-per-epoch 150`` (the demo's CQAT row, first/last 8-bit) from the demo's cached ResNet-20 /
Fashion-MNIST checkpoint, seeds 0 and 1 (data order and augmentation; the same float start and calibration
images).  Reported per seed and as mean +- half the spread: test top-1 before fine-tuning (the calibrated start)
and after.  The MobileNetV2 rows of ``benchmarks/results/mobilenet.md`` measure the same choice after four
epochs.  Quick mode: the small CNN on digits, 5 steps.  Run directories: ``runs/bench_pow2_step``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import float_checkpoint, markdown_table, write_results

NAME = "pow2_step"
SEEDS = (0, 1)
STEPS = ("round", "search")


def _mean_spread(values: list[float]) -> str:
    m = sum(values) / len(values)
    return f"{m:.2f} +- {(max(values) - min(values)) / 2:.2f}"


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    per_seed = markdown_table(rows, [("pow2_step", "pow2 step"), ("seed", "seed"), ("start_top1", "start top-1 %"),
                                     ("top1", "top-1 % after fine-tuning"), ("train_seconds", "train s")])
    summary = []
    for step in STEPS:
        mine = [r for r in rows if r["pow2_step"] == step]
        summary.append({"pow2 step": step, "seeds": len(mine),
                        "start top-1 % (mean +- half spread)": _mean_spread([r["start_top1"] for r in mine]),
                        "top-1 % (mean +- half spread)": _mean_spread([r["top1"] for r in mine])})
    agg = markdown_table(summary, [(k, k) for k in summary[0]])
    return (f"{agg}\n\n{per_seed}\n\nCQAT W5A4, first/last 8-bit, power-of-two steps, {results['steps']} steps of "
            f"batch 128 from the float model ({results['checkpoint']}, FP32 top-1 {results['fp32_top1']:.2f} %); "
            "test top-1 on the whole test set.\n")


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.pipelines import QATOptions, run_qat

    ckpt = float_checkpoint(quick, "bench_pow2_step_float")
    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_pow2_step_quick" if quick else
                                                                "bench_pow2_step")
    steps = 5 if quick else 150
    extra: dict[str, Any] = {"batch_size": 64, "channels_last": False} if quick else {}
    rows = []
    fp32 = None
    for seed in SEEDS:
        for step in STEPS:
            res = run_qat(QATOptions(checkpoint=str(ckpt), method="cqat", w_bits=5, a_bits=4, pow2=True,
                                     pow2_step=step, epochs=1, steps_per_epoch=steps, seed=seed, progress=False,
                                     out=str(runs / f"{step}_s{seed}"), **extra))
            fp32 = res["fp32"]["top1"]
            rows.append({"pow2_step": step, "seed": seed, "start_top1": res["start"]["top1"],
                         "top1": res["final"]["top1"], "train_seconds": res["train_seconds"]})
    results = {"rows": rows, "steps": steps, "checkpoint": str(ckpt), "fp32_top1": fp32}
    md = table(results)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

"""The report's diagnosis on the demo checkpoint: which layer GGD PTQ loses most on at W4A4.

GGD PTQ + BFT at W4A4 with **every** layer at 4 bits (the setting where the PTQ benchmark found GGD far behind
the baselines, and traced it to the first conv's input: half of the pixels sit on one background value that a
power-of-two grid moves) on the demo's cached ResNet-20 / Fashion-MNIST checkpoint, then
``hwquant report`` on the run (:func:`hwquant.pipelines.run_report`, 256 held-out calibration images): the
per-layer sensitivity (one layer quantized, the rest float; and every layer but one), lowest logit SQNR first.
Run directory ``$HWQUANT_BENCH_RUNS/bench_report`` (reused when present).  Quick mode: the small CNN on digits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import float_checkpoint, markdown_table, write_results

NAME = "report"


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    import json

    from hwquant.pipelines import PTQOptions, ReportOptions, run_ptq, run_report

    ck = float_checkpoint(quick, "bench_report_digits")
    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_report_quick" if quick else "bench_report")
    run_dir = runs / "ptq_ggd_w4a4"
    if not (run_dir / "model.pt").exists():
        run_ptq(PTQOptions(checkpoint=str(ck), method="ggd", w_bits=4, a_bits=4, out=str(run_dir), progress=False))
    ptq = json.loads((run_dir / "ptq.json").read_text())
    rep = run_report(ReportOptions(run_dir=str(run_dir), images=100 if quick else 256))["report"]
    sens = rep["sensitivity"]
    results = {"checkpoint": str(ck), "run_dir": str(run_dir), "fp32_top1": ptq["fp32"]["top1"],
               "ggd_w4a4_top1": ptq["quant"]["top1"], "images": rep["images"],
               "most_sensitive_layer": sens[0]["layer"] if sens else None, "sensitivity": sens,
               "layers": rep["layers"]}
    md = markdown_table(sens, [("layer", "layer"), ("only_sqnr_db", "logit SQNR dB, only this layer quantized"),
                               ("only_top1", "top-1 %, only this layer"),
                               ("all_but_sqnr_db", "logit SQNR dB, every layer but this one"),
                               ("all_but_top1", "top-1 %, all but this one")])
    md = (f"GGD PTQ + BFT W4A4, every layer 4-bit, on `{ck}`: test top-1 {results['ggd_w4a4_top1']:.2f} % "
          f"(FP32 {results['fp32_top1']:.2f} %). `hwquant report {run_dir}` on {rep['images']} held-out calibration "
          f"images, most sensitive layer first: **{results['most_sensitive_layer']}**.\n\n{md}\n")
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

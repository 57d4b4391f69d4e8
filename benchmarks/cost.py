"""Hardware cost of the deployed models: bits stored, compression, BOPs, cycles and energy per image.

The models of the export benchmark (GGD PTQ W8A8 and W4A4, min-max W8A8, CQAT W5A4 MSE and pow2; built
the same way and reused from ``runs/bench_export`` / ``runs/bench_qat`` when present) and the FP32 network,
through :func:`hwquant.hw.cost_report` on the default :class:`hwquant.hw.PEArray` (16 x 16 PEs of four
2-bit bricks, 128 KiB activation buffer, 500 MHz, Horowitz 45 nm energies).  Also the same with 8-bit
bricks (a fixed 8x8 array: no gain below 8 bits), to show what the reconfigurable PE buys.  Counts only, no
timing: the figures are exact for the model and the same on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import float_checkpoint, markdown_table, write_results
from .export import _build, _models

NAME = "cost"


def _row(name: str, model, example, pe, fp32: dict[str, Any]) -> dict[str, Any]:
    from hwquant.hw import cost_report

    t = cost_report(model, example, pe)["total"]
    return {"model": name, "w_bits_mean": t["w_bits_mean"], "stored_kib": t["stored_bits"] / 8192,
            "compression": t["compression_ratio"], "gbops": t["bops"] / 1e9, "cycles": t["cycles"],
            "latency_us": t["latency_us"], "compute_uj": t["e_compute_pj"] * 1e-6,
            "sram_uj": t["e_sram_pj"] * 1e-6, "dram_uj": t["e_dram_pj"] * 1e-6, "energy_uj": t["energy_uj"],
            "x_fp32_energy": t["e_total_pj"] / fp32["e_total_pj"]}


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.hw import PEArray, cost_report
    from hwquant.pipelines import checkpoint_loaders, load_model

    ck = float_checkpoint(quick, "bench_export_digits")
    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_export_quick" if quick else "bench_export")
    float_model, fck = load_model(ck)
    example = next(iter(checkpoint_loaders(fck, None, 1).test))[0][:1]
    arrays = {"2-bit bricks (reconfigurable)": PEArray(), "8-bit bricks (fixed 8x8)": PEArray(brick_bits=8,
                                                                                            bricks_per_pe=1)}
    models = [("FP32", float_model)] + [(name, load_model(_build(kind, opts, ck, quick, runs))[0])
                                        for name, kind, opts in _models(quick)]
    results: dict[str, Any] = {"example_shape": list(example.shape), "arrays": {}}
    md = ""
    for label, pe in arrays.items():
        fp32 = cost_report(float_model, example, pe)["total"]
        rows = [_row(name, m, example, pe, fp32) for name, m in models]
        results["arrays"][label] = {"pe": {k: v for k, v in vars(pe).items() if k != "energy"}, "rows": rows}
        md += f"\n## {label}\n\n" + markdown_table(rows, [
            ("model", "model"), ("w_bits_mean", "mean W bits"), ("stored_kib", "stored KiB"),
            ("compression", "compression x"), ("gbops", "GBOPs"), ("cycles", "cycles"),
            ("compute_uj", "compute uJ"), ("sram_uj", "SRAM uJ"), ("dram_uj", "DRAM uJ"),
            ("energy_uj", "energy uJ"), ("x_fp32_energy", "x FP32 energy")], digits=3) + "\n"
    md = (f"Per image ({'x'.join(map(str, example.shape[1:]))} input); PE array and energy model of "
          "`hwquant.hw` (45 nm, Horowitz ISSCC 2014).\n" + md)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

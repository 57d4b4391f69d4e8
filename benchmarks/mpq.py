"""MPQ benchmark: mixed precision from weight flips against uniform retraining, with bits stored and energy.

Fashion-MNIST ResNet-20 (the demo's cached 4-epoch checkpoint), every run fine-tuned from it through
``hwquant qat --method mpq`` (:func:`hwquant.pipelines.run_qat`) with the QAT defaults (2 epochs, lr 0.005
cosine, gradient norm clipped at 2, same seed and data order), on one mechanism (fixed MSE-calibrated
per-channel weight grid, min-max EMA activations, first conv / last FC at 8 bits):

* ``uniform W4A4`` (``max_extra=0, gamma=1``): the paper's baseline;
* ``uniform W3A4``: the base precision without the extra bit;
* ``MPQ W3(+1)A4``: at half of retraining the weights with the most flips (at least ``min_flips``, at most
  ``max_extra`` of each layer) get a 4th bit; learning rate x0.1 within 0.1 steps of a threshold;
* the two parts alone: ``W3A4 + lr near threshold`` and ``W3(+1)A4 without the lr factor``.

For each: top-1 before and after, mean weight bits of the mixed layers, the bits stored (codes + extra-bit
index + biases + scales, :func:`hwquant.hw.cost_report`), compression against FP32 and against uniform W4A4,
and energy per image on the default reconfigurable PE array (2-bit bricks: a 3-bit weight costs what a 4-bit
one does in the multiplier, but not in memory).  Quick mode: the small CNN on digits, two short runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import float_checkpoint, markdown_table, write_results

NAME = "mpq"

RUNS = [
    ("uniform W4A4", {"w_bits": 4, "mpq_max_extra": 0.0, "mpq_gamma": 1.0}),
    ("uniform W3A4", {"w_bits": 3, "mpq_max_extra": 0.0, "mpq_gamma": 1.0}),
    ("MPQ W3(+1)A4", {"w_bits": 3}),
    ("W3A4 + lr near threshold", {"w_bits": 3, "mpq_max_extra": 0.0}),
    ("W3(+1)A4 without the lr factor", {"w_bits": 3, "mpq_gamma": 1.0}),
]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.hw import cost_report
    from hwquant.pipelines import QATOptions, _loaders_for, load_model, resumable, run_qat

    ck = float_checkpoint(quick, "bench_mpq_digits")
    runs_dir = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_mpq_quick" if quick else "bench_mpq")
    epochs = 1 if quick else int(os.environ.get("HWQUANT_MPQ_EPOCHS", "2"))
    extra = {"batch_size": 64, "channels_last": False, "mpq_min_flips": 1} if quick else {}
    plan = RUNS[:3:2] if quick else RUNS
    float_model, fck = load_model(ck)
    example = next(iter(_loaders_for(fck, None, 1).test))[0][:1]
    fp32 = cost_report(float_model, example)["total"]
    rows = []
    for name, opts in plan:
        cfg = QATOptions(checkpoint=str(ck), method="mpq", a_bits=4, epochs=epochs, out=str(runs_dir / _slug(name)),
                         resume=resumable(runs_dir / _slug(name)), progress=False, **extra, **opts)
        res = run_qat(cfg)
        model, _ = load_model(runs_dir / _slug(name) / "model.pt")
        t = cost_report(model, example)["total"]
        mixed = res["mpq"] or []
        n = sum(r["weights"] for r in mixed)
        rows.append({
            "run": name, "start_top1": res["start"]["top1"], "top1": res["final"]["top1"],
            "top5": res["final"]["top5"], "checkpoint_top1": res["fp32"]["top1"],
            "extra_pct": 100 * sum(r["extra"] for r in mixed) / max(1, n),
            "w_bits_mixed": sum(r["w_bits_mean"] * r["weights"] for r in mixed) / max(1, n),
            "w_bits_all": t["w_bits_mean"], "stored_kib": t["stored_bits"] / 8192, "index_kib": t["index_bits"] / 8192,
            "compression_vs_fp32": t["compression_ratio"], "energy_uj": t["energy_uj"],
            "dram_uj": t["e_dram_pj"] * 1e-6, "x_fp32_energy": t["e_total_pj"] / fp32["e_total_pj"],
            "train_s": res["train_seconds"], "layers": mixed,
        })
        print(f"  {name}: {res['start']['top1']:.2f}% -> {res['final']['top1']:.2f}%, "
              f"{rows[-1]['stored_kib']:.1f} KiB", flush=True)
    base = rows[0]
    for r in rows:
        r["compression_vs_w4a4"] = base["stored_kib"] / r["stored_kib"]
        r["x_w4a4_energy"] = r["energy_uj"] / base["energy_uj"]
        r["drop_vs_w4a4"] = base["top1"] - r["top1"]
    results = {"checkpoint": str(ck), "epochs": epochs, "example_shape": list(example.shape), "rows": rows,
               "fp32_cost": fp32}
    md = markdown_table(rows, [
        ("run", "run"), ("start_top1", "start top-1"), ("top1", "top-1"), ("drop_vs_w4a4", "drop vs W4A4 (pt)"),
        ("extra_pct", "extra-bit weights %"), ("w_bits_mixed", "mean W bits (low-bit layers)"),
        ("w_bits_all", "mean W bits (all)"), ("stored_kib", "stored KiB"), ("index_kib", "index KiB"),
        ("compression_vs_fp32", "compression vs FP32"), ("compression_vs_w4a4", "compression vs W4A4"),
        ("energy_uj", "energy uJ/image"), ("x_w4a4_energy", "x W4A4 energy"), ("train_s", "train s")])
    md = (f"Fine-tuned {epochs} epochs from `{ck}` (FP32 top-1 {base['checkpoint_top1']:.2f}%); FP32 cost "
          f"{fp32['stored_bits'] / 8192:.1f} KiB, {fp32['energy_uj']:.1f} uJ/image.\n\n{md}\n")
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

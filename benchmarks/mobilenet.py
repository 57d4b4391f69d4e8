"""MobileNetV2 (small-input variant, width 0.5) on Fashion-MNIST: FP32, PTQ, GGD PTQ and CQAT, each exported
to the integer model and checked (fake quant vs integer model on the whole test set, onnxruntime with its
default options vs the integer model, golden vectors replayed from the files).

The network is what users bring and the ResNets are not: ReLU6 (the requantizer's saturation in the integer
model), depthwise convolutions, linear bottlenecks with residual adds, a 1280-channel head.

Rows (one float checkpoint, seed 0; the same 1000 held-out calibration images for every method):

* ``FP32``: ``hwquant train --model mobilenet_v2 --width 0.5 --epochs 3`` (seed 0);
* ``min-max PTQ W8A8``: per-channel weights, float scales;
* ``GGD PTQ W8A8``: fixed point (power-of-two steps), backward-forward tuning scored on 128 calibration images
  (BFT costs 8 forward passes per layer; with 52 layers, 512 images would take half an hour here), with one
  weight FL per layer (the paper's) and with one FL per output channel: BN folding leaves MobileNetV2's
  depthwise kernels with per-channel ranges that differ by up to 4000x, which a per-layer FL cannot hold;
* ``CQAT W5A4`` (the method's default MSE step, float scales) and ``CQAT W5A4 pow2`` (fixed point): one epoch
  of QAT from the FP32 checkpoint (lr 0.005, the qat defaults otherwise), first/last 8-bit; both also for two
  epochs (cosine schedule over the two); pow2 also with ``--pow2-step search`` (the MSE-best power of two
  instead of the rounded MSE step).

Top-1 is on the whole test set (what ``hwquant ptq`` / ``qat`` report); the export checks of
:func:`benchmarks.export._row` (fake quant vs integer model, onnxruntime vs integer model, top-1 of each) run
on the first ``CHECK_IMAGES`` test images: the int64 integer model of this 52-layer network takes about 40 ms
per image on these two cores.  Model directories under
``$HWQUANT_BENCH_RUNS/bench_mbv2`` (default ``runs``) are reused when present, so a rerun only re-checks.
``--quick``: width 0.25 on scikit-learn digits, two PTQ rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import markdown_table, write_results
from .export import _row

NAME = "mobilenet"
WIDTH = 0.5
EPOCHS = 3
CHECK_IMAGES = 2048


def _runs(quick: bool) -> Path:
    return Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_mbv2_quick" if quick else "bench_mbv2")


def _float_checkpoint(quick: bool) -> Path:
    from hwquant.pipelines import TrainOptions, resumable, run_train

    out = _runs(quick)
    if not (out / "model.pt").exists():
        if quick:
            run_train(TrainOptions(model="mobilenet_v2", width=0.25, dataset="digits", epochs=4, batch_size=64,
                                   lr=0.05, out=str(out), progress=False, channels_last=False, resume=resumable(out)))
        else:
            run_train(TrainOptions(model="mobilenet_v2", width=WIDTH, dataset="fashion_mnist", epochs=EPOCHS,
                                   seed=0, out=str(out), progress=False, resume=resumable(out)))
    return out / "model.pt"


def _models(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    if quick:
        return [("min-max PTQ W8A8", "ptq", {"method": "minmax"}),
                ("GGD PTQ W8A8 (fixed point)", "ptq", {"method": "ggd", "bft": False})]
    return [
        ("min-max PTQ W8A8 (float scales)", "ptq", {"method": "minmax"}),
        ("GGD PTQ W8A8 (fixed point, per-layer FL as in the paper, BFT on 128 images)", "ptq",
         {"method": "ggd", "bft_samples": 128}),
        ("GGD PTQ W8A8 (fixed point, per-channel FL, BFT on 128 images)", "ptq",
         {"method": "ggd", "bft_samples": 128, "per_channel": True}),
        ("CQAT W5A4 (MSE steps, float scales)", "qat", {"method": "cqat", "_dir": "cqat_w5a4"}),
        ("CQAT W5A4 (MSE steps, float scales), 2 epochs", "qat", {"method": "cqat", "_dir": "cqat_w5a4_2ep",
                                                                  "_epochs": 2}),
        ("CQAT W5A4 pow2 (fixed point)", "qat", {"method": "cqat", "pow2": True, "_dir": "cqat_w5a4_pow2"}),
        ("CQAT W5A4 pow2 (fixed point), 2 epochs", "qat", {"method": "cqat", "pow2": True,
                                                           "_dir": "cqat_w5a4_pow2_2ep", "_epochs": 2}),
        ("CQAT W5A4 pow2, MSE-best power of two (fixed point)", "qat",
         {"method": "cqat", "pow2": True, "pow2_step": "search", "_dir": "cqat_w5a4_pow2_search"}),
        ("CQAT W5A4 pow2, MSE-best power of two (fixed point), 2 epochs", "qat",
         {"method": "cqat", "pow2": True, "pow2_step": "search", "_dir": "cqat_w5a4_pow2_search_2ep",
          "_epochs": 2}),
    ]


def _build(kind: str, opts: dict[str, Any], ck: Path, quick: bool) -> tuple[Path, dict[str, Any]]:
    import json

    from hwquant.pipelines import PTQOptions, QATOptions, resumable, run_ptq, run_qat

    opts = dict(opts)
    sub = opts.pop("_dir", None)
    epochs = opts.pop("_epochs", 1)
    runs = _runs(quick)
    if kind == "ptq":
        out = runs / ("ptq_" + "_".join(f"{k}-{v}" for k, v in sorted(opts.items())))
        if not (out / "model.pt").exists():
            run_ptq(PTQOptions(checkpoint=str(ck), out=str(out), progress=False, **opts))
        rep = json.loads((out / "ptq.json").read_text())
        return out / "model.pt", {"top1": rep["quant"]["top1"], "seconds": rep["report"].get("seconds")}
    out = runs / sub
    if not (out / "model.pt").exists():
        run_qat(QATOptions(checkpoint=str(ck), out=str(out), lr=0.005, epochs=epochs, resume=resumable(out),
                           progress=False, **opts))
    rep = json.loads((out / "qat.json").read_text())
    return out / "model.pt", {"top1": rep["final"]["top1"], "start_top1": rep["start"]["top1"],
                              "train_seconds": rep["train_seconds"]}


def table(results: dict[str, Any]) -> str:
    fp32 = results["fp32_top1"]
    rows = [{"model": "FP32 (BN unfolded)", "top1": f"{fp32:.2f}", "drop": "-", "fq": "-", "int": "-", "ort": "-",
             "codes": "-", "ort_codes": "-", "golden": "-", "acc": "-"}]
    for r in results["rows"]:
        rows.append({
            "model": r["model"], "top1": f"{r['top1']:.2f}", "drop": f"{fp32 - r['top1']:.2f}",
            "fq": f"{r['top1_fake_quant']:.2f}", "int": f"{r['top1_integer']:.2f}", "ort": f"{r['top1_onnx']:.2f}",
            "codes": f"{r['codes_diff']} / {r['codes']:.3g} (max {r['max_code_lsb']})",
            "ort_codes": f"{r['onnx_codes_diff']} (max {r['onnx_max_code_lsb']}, {r['onnx_optimize']})",
            "golden": "pass" if r["golden_ok"] else "FAIL", "acc": str(r["acc_bits_max"]),
        })
    cols = [("model", "model"), ("top1", "top-1 % (test set)"), ("drop", "drop vs FP32 (pt)"),
            ("fq", "checked images: top-1 fake quant"), ("int", "top-1 integer"), ("ort", "top-1 onnxruntime"),
            ("codes", "codes differ int vs fake quant (max LSB)"),
            ("ort_codes", "ORT codes differ vs int (max LSB, optimization)"), ("golden", "golden replay"),
            ("acc", "acc bits")]
    n = results["rows"][0]["images"] if results["rows"] else 0
    note = (f"\n\n{results['dataset']}, top-1 on the whole test set; export checks on the first {n} test images. "
            "MobileNetV2 small-input variant, width "
            f"{results['width']}, {results['params']} parameters, FP32 trained {results['epochs']} epochs (seed 0). "
            "`codes differ`: layer-input codes of the integer model that differ from the fake-quant model's at "
            "the same layer. ORT: the QDQ ONNX file in an onnxruntime CPU session with default options.\n")
    d = results.get("ggd_per_layer_fl_diagnosis")
    if d:
        note += (f"\nGGD with one weight FL per layer: the first layer below 10 dB is `{d['layer']}` "
                 f"(groups {d['groups']}), output SQNR {d['out_sqnr_db']:.1f} dB; after BN folding its output "
                 f"channels' max|w| range from {d['channel_absmax_min']:.3g} to {d['channel_absmax_max']:.3g}, "
                 f"its FL is {d['w_fl']} (step {d['w_step']:g}) and {d['channels_all_zero']} of its channels "
                 "quantize to all-zero weights.\n")
    return markdown_table(rows, cols) + note


def _previous_rows(out_dir) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run's results file, by checkpoint, to resume rather than restart (a row is reused
    when its checkpoint is older than that file and was checked on ``CHECK_IMAGES`` images)."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())["results"]
    except (ValueError, KeyError):
        return {}
    done = path.stat().st_mtime
    return {r["checkpoint"]: r for r in old.get("rows", [])
            if Path(r["checkpoint"]).exists() and Path(r["checkpoint"]).stat().st_mtime < done
            and r.get("images") == CHECK_IMAGES}


def _depthwise_diagnosis(float_model, ptq_dir: Path) -> dict[str, Any]:
    """Why one weight FL per layer fails here: the first layer whose output SQNR (noise accumulated from the
    input on) falls below 10 dB in the per-layer GGD run, its FL, and the spread of its output channels'
    max|w| after BN folding."""
    import json

    from hwquant.nn import fold_batchnorm

    rep = json.loads((ptq_dir / "ptq.json").read_text())["report"]
    rows = rep.get("layers_before_bft") or rep["layers"]
    worst = next((r for r in rows if r["out_sqnr_db"] < 10.0), min(rows, key=lambda r: r["out_sqnr_db"]))
    w = fold_batchnorm(float_model).get_submodule(worst["layer"]).weight.detach()
    peak = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    return {"layer": worst["layer"], "groups": float_model.get_submodule(worst["layer"]).groups,
            "w_fl": worst["w_fl"], "w_step": 2.0 ** -worst["w_fl"], "out_sqnr_db": worst["out_sqnr_db"],
            "channel_absmax_min": float(peak.min()), "channel_absmax_max": float(peak.max()),
            "channels_all_zero": int((torch_round_zero(w, worst["w_fl"])).sum())}


def torch_round_zero(w, fl: int):
    """Per output channel: 1 if every weight of the channel rounds to code 0 at step ``2^-fl``."""
    import torch

    codes = torch.round(w * 2.0**fl).reshape(w.shape[0], -1)
    return (codes == 0).all(dim=1).to(torch.int64)


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.pipelines import load_model

    ck = _float_checkpoint(quick)
    float_model, fck = load_model(ck)
    check_images = None if quick else CHECK_IMAGES
    previous = {} if quick else _previous_rows(out_dir)
    rows = []
    for name, kind, opts in _models(quick):
        path, extra = _build(kind, opts, ck, quick)
        if str(path) in previous:
            rows.append({**previous[str(path)], "model": name, **extra})
            print(f"  {name}: checks reused from the previous results file", flush=True)
            continue
        row = {**_row(name, path, quick, float_model, max_images=check_images), **extra,
               "check_images": check_images}
        rows.append(row)
        print(f"  {name}: FQ {row['top1_fake_quant']:.2f} int {row['top1_integer']:.2f} ORT {row['top1_onnx']:.2f}; "
              f"codes differ {row['codes_diff']}, ORT {row['onnx_codes_diff']}", flush=True)
    per_layer = _runs(quick) / "ptq_bft_samples-128_method-ggd"
    diagnosis = None if quick or not (per_layer / "ptq.json").exists() else _depthwise_diagnosis(float_model, per_layer)
    results = {"checkpoint": str(ck), "check_images": check_images, "dataset": fck["data"]["dataset"],
               "ggd_per_layer_fl_diagnosis": diagnosis,
               "fp32_top1": fck["metrics"]["top1"],
               "width": fck["model_args"].get("width"), "epochs": len(fck["history"]["epochs"]),
               "params": sum(p.numel() for p in float_model.parameters()), "rows": rows}
    md = table(results)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

"""MobileNetV2 (small-input variant, width 0.5) on Fashion-MNIST: FP32, PTQ, GGD PTQ and CQAT, each exported
to the integer model and checked (fake quant vs integer model on the whole test set, onnxruntime with its
default options vs the integer model, golden vectors replayed from the files).

The network is what users bring and the ResNets are not: ReLU6 (the requantizer's saturation in the integer
model), depthwise convolutions, linear bottlenecks with residual adds, a 1280-channel head.

Rows (one float checkpoint, seed 0; the same 1000 held-out calibration images for every method):

* ``FP32``: ``hwquant train --model mobilenet_v2 --width 0.5 --epochs 3`` (seed 0);
* ``min-max PTQ W8A8``: per-channel weights, float scales;
* ``GGD PTQ W8A8``: fixed point (power-of-two steps), backward-forward tuning scored by top-1 (the paper's
  criterion; no hold-out) on 128 calibration images
  (BFT costs 8 forward passes per layer; with 52 layers, 512 images would take half an hour here), with one
  weight FL per layer (the paper's) and with one FL per output channel: BN folding leaves MobileNetV2's
  depthwise kernels with per-channel ranges that differ by up to 4000x, which a per-layer FL cannot hold;
* ``CQAT W5A4`` (the method's default MSE step, float scales) and ``CQAT W5A4 pow2`` (fixed point): one epoch
  of QAT from the FP32 checkpoint (lr 0.005, the qat defaults otherwise), first/last 8-bit; both also for two
  epochs (cosine schedule over the two); pow2 also with ``--pow2-step search`` (the MSE-best power of two
  instead of the rounded MSE step); the 4-epoch pow2 rows also with seed 1 (data order; same FP32 start).

Top-1 is on the whole test set (what ``hwquant ptq`` / ``qat`` report); the export checks of
:func:`benchmarks.export._row` (fake quant vs integer model, onnxruntime vs integer model, top-1 of each) run
on the first ``CHECK_IMAGES`` test images: the int64 integer model of this 52-layer network takes about 40 ms
per image on these two cores.  Model directories under
``$HWQUANT_BENCH_RUNS/bench_mbv2`` (default ``runs``) are reused when present, so a rerun only re-checks.
``HWQUANT_MBV2_ONLY=dir,dir`` builds only those rows (run directory names) and keeps the others from the earlier
results file when it was made from an FP32 model of the same accuracy.
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
         {"method": "ggd", "bft_samples": 128, "bft_criterion": "top1", "bft_holdout": 0}),
        ("GGD PTQ W8A8 (fixed point, per-channel FL, BFT on 128 images)", "ptq",
         {"method": "ggd", "bft_samples": 128, "per_channel": True, "bft_criterion": "top1", "bft_holdout": 0}),
        ("CQAT W5A4 (MSE steps, float scales)", "qat", {"method": "cqat", "_dir": "cqat_w5a4"}),
        ("CQAT W5A4 (MSE steps, float scales), 2 epochs", "qat", {"method": "cqat", "_dir": "cqat_w5a4_2ep",
                                                                  "_epochs": 2}),
        ("CQAT W5A4 pow2 (fixed point)", "qat", {"method": "cqat", "pow2": True, "_dir": "cqat_w5a4_pow2"}),
        ("CQAT W5A4 pow2 (fixed point), 2 epochs", "qat", {"method": "cqat", "pow2": True,
                                                           "_dir": "cqat_w5a4_pow2_2ep", "_epochs": 2}),
        ("CQAT W5A4 pow2 (fixed point), 4 epochs", "qat", {"method": "cqat", "pow2": True,
                                                           "_dir": "cqat_w5a4_pow2_4ep", "_epochs": 4}),
        ("FP32 control: BN-folded float model fine-tuned like CQAT, 4 epochs", "qat",
         {"method": "fp32", "_dir": "fp32_ft_4ep", "_epochs": 4}),
        ("CQAT W5A4 pow2, MSE-best power of two (fixed point)", "qat",
         {"method": "cqat", "pow2": True, "pow2_step": "search", "_dir": "cqat_w5a4_pow2_search"}),
        ("CQAT W5A4 pow2, MSE-best power of two (fixed point), 2 epochs", "qat",
         {"method": "cqat", "pow2": True, "pow2_step": "search", "_dir": "cqat_w5a4_pow2_search_2ep",
          "_epochs": 2}),
        ("CQAT W5A4 pow2, MSE-best power of two (fixed point), 4 epochs", "qat",
         {"method": "cqat", "pow2": True, "pow2_step": "search", "_dir": "cqat_w5a4_pow2_search_4ep",
          "_epochs": 4}),
        ("CQAT W5A4 pow2 (fixed point), 4 epochs, seed 1", "qat",
         {"method": "cqat", "pow2": True, "seed": 1, "_dir": "cqat_w5a4_pow2_4ep_s1", "_epochs": 4}),
        ("CQAT W5A4 pow2, MSE-best power of two (fixed point), 4 epochs, seed 1", "qat",
         {"method": "cqat", "pow2": True, "pow2_step": "search", "seed": 1, "_dir": "cqat_w5a4_pow2_search_4ep_s1",
          "_epochs": 4}),
    ]


def _key(kind: str, opts: dict[str, Any]) -> str:
    """A row's run directory name under :func:`_runs` (what ``HWQUANT_MBV2_ONLY`` lists); the BFT criterion
    options are left out of the name (the rows were made before they existed, with the settings given)."""
    if kind == "qat":
        return opts["_dir"]
    return "ptq_" + "_".join(f"{k}-{v}" for k, v in sorted(opts.items()) if not k.startswith("bft_c")
                             and k != "bft_holdout")


def _build(kind: str, opts: dict[str, Any], ck: Path, quick: bool) -> tuple[Path, dict[str, Any]]:
    import json

    from hwquant.pipelines import PTQOptions, QATOptions, resumable, run_ptq, run_qat

    opts = dict(opts)
    sub = opts.pop("_dir", None)
    epochs = opts.pop("_epochs", 1)
    runs = _runs(quick)
    if kind == "ptq":
        out = runs / _key(kind, opts)
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
        if r.get("control"):
            rows.append({"model": r["model"], "top1": f"{r['top1']:.2f}", "drop": f"{fp32 - r['top1']:.2f}",
                         **{k: "-" for k in ("fq", "int", "ort", "codes", "ort_codes", "golden", "acc")}})
            continue
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
    n = next((r["images"] for r in results["rows"] if "images" in r), 0)
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
    p2 = results.get("pow2_diagnosis")
    if p2:
        mean = {k: sum(r[f"in_{k}_db"] for r in p2) / len(p2) for k in ("mse", "round", "search")}
        wmean = {k: sum(r[f"w_{k}_db"] for r in p2) / len(p2) for k in ("mse", "round", "search")}
        worst = sorted(p2, key=lambda r: r["in_round_db"] - r["in_mse_db"])[:3]
        note += ("\nPower-of-two steps before training (CQAT W5A4 quantizers, each model's on the inputs it "
                 "computes with its quantized weights, as calibrated; two calibration batches, mean over "
                 f"{len(p2)} layers): input SQNR {mean['mse']:.1f} dB with MSE "
                 f"steps, {mean['round']:.1f} dB rounded to a power of two, {mean['search']:.1f} dB MSE-best power "
                 f"of two; weights {wmean['mse']:.1f} / {wmean['round']:.1f} / {wmean['search']:.1f} dB. Largest "
                 "input losses from rounding: " + "; ".join(
                     f"`{r['layer']}` {r['in_mse_db']:.1f} -> {r['in_round_db']:.1f} dB (step {r['in_step_mse']:.3g}"
                     f" -> {r['in_step_round']:.3g}, input max {r['input_max_round']:.3g})" for r in worst) + ".\n")
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


def _earlier_results(out_dir, fp32_top1: float) -> dict[str, Any]:
    """With ``HWQUANT_MBV2_ONLY``: the earlier results file's results, when that file was made from an FP32
    model with the same test accuracy (its rows compare against it); otherwise ``{}`` (nothing is kept)."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())["results"]
    if old.get("fp32_top1") != fp32_top1:
        print(f"  previous results were made from another FP32 model ({old.get('fp32_top1')} % vs {fp32_top1} %): "
              "their rows are not kept", flush=True)
        return {}
    return old


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


def _pow2_diagnosis(float_model, fck: dict[str, Any], batches: int = 2) -> list[dict[str, Any]]:
    """Where a power-of-two grid costs CQAT W5A4 before any training: per quantized layer, the SQNR (dB) of its
    weight and of its input quantized with the MSE step (float scales, ``mse``), that step rounded to a power
    of two (``round``) and the MSE-best power of two (``search``).  Each model's input quantizers are applied
    to the inputs that model computes in the state its steps were calibrated in (its quantized weights, float
    activations; ``batches`` calibration batches), so a step is judged on the data it was fitted to; the
    weight SQNR is on the BN-folded FP32 weights.  Also the input step and the input's maximum (a ReLU6 input
    at step ``s`` saturates at ``min(15, 6 / s)``)."""
    import torch

    from hwquant.methods import CQATConfig, prepare_qat
    from hwquant.nn import fold_batchnorm
    from hwquant.nn.swap import quant_layers
    from hwquant.pipelines import checkpoint_loaders

    calib = checkpoint_loaders(fck, None, 128).calib
    configs = {"mse": CQATConfig(), "round": CQATConfig(pow2=True),
               "search": CQATConfig(pow2=True, pow2_step="search")}
    qmodels = {k: prepare_qat(float_model, c, calib).eval() for k, c in configs.items()}
    folded = fold_batchnorm(float_model).eval()
    names = [n for n, _ in quant_layers(qmodels["mse"])]
    inputs: dict[str, dict[str, list]] = {k: {n: [] for n in names} for k in qmodels}
    for k, qm in qmodels.items():
        layers = dict(quant_layers(qm))
        for layer in layers.values():
            layer.input_quant.enabled = False
        hooks = [layers[n].register_forward_pre_hook(lambda m, a, n=n, k=k: inputs[k][n].append(a[0].detach()))
                 for n in names]
        with torch.no_grad():
            for i, (x, _) in enumerate(calib):
                if i == batches:
                    break
                qm(x)
        for h in hooks:
            h.remove()
        for layer in layers.values():
            layer.input_quant.enabled = True

    def sqnr(x, xq):
        return float(10 * torch.log10(x.pow(2).sum() / (x - xq).pow(2).sum().clamp_min(1e-30)))

    rows = []
    with torch.no_grad():
        for n in names:
            w = folded.get_submodule(n).weight
            row = {"layer": n, "groups": getattr(folded.get_submodule(n), "groups", 1)}
            for k, qm in qmodels.items():
                layer = qm.get_submodule(n)
                x = torch.cat(inputs[k][n])
                row[f"input_max_{k}"] = float(x.max())
                row[f"in_{k}_db"] = sqnr(x, layer.input_quant(x))
                row[f"w_{k}_db"] = sqnr(w, layer.weight_quant(w))
                row[f"in_step_{k}"] = float(layer.input_quant.scale.max())
            rows.append(row)
    return rows


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
    only = None if quick else os.environ.get("HWQUANT_MBV2_ONLY")
    earlier = _earlier_results(out_dir, fck["metrics"]["top1"]) if only else {}
    kept = {r["model"]: r for r in earlier.get("rows", [])}
    rows = []
    for name, kind, opts in _models(quick):
        if only and _key(kind, opts) not in only.split(","):
            if name in kept:  # not run now: the earlier file's row (same FP32 model), if it has one
                rows.append(kept[name])
                print(f"  {name}: kept from the previous results file", flush=True)
            continue
        path, extra = _build(kind, opts, ck, quick)
        if opts.get("method") == "fp32":  # a float control: nothing to export or check
            rows.append({"model": name, "control": True, "checkpoint": str(path), **extra})
            print(f"  {name}: {extra['top1']:.2f}", flush=True)
            continue
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
    diagnosis = diagnosis or earlier.get("ggd_per_layer_fl_diagnosis")
    pow2 = None if quick else _pow2_diagnosis(float_model, fck)
    results = {"checkpoint": str(ck), "check_images": check_images, "dataset": fck["data"]["dataset"],
               "ggd_per_layer_fl_diagnosis": diagnosis, "pow2_diagnosis": pow2,
               "fp32_top1": fck["metrics"]["top1"],
               "width": fck["model_args"].get("width"), "epochs": len(fck["history"]["epochs"]),
               "params": sum(p.numel() for p in float_model.parameters()), "rows": rows}
    md = table(results)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

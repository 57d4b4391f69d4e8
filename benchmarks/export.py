"""Integer deployment: bit-exactness of the integer model, onnxruntime, golden replay, and inference time.

For each quantized ResNet-20 / Fashion-MNIST model (from the demo's float checkpoint):

* ``GGD PTQ W8A8`` and ``GGD PTQ W4A4 (first/last 8-bit)``: fixed point (power-of-two steps), BFT on;
* ``min-max PTQ W8A8``: float scales;
* ``CQAT W5A4`` (MSE steps: float scales) and ``CQAT W5A4 pow2`` (power-of-two steps), 2 epochs as in the
  qat benchmark (its checkpoints under ``runs/bench_qat`` are reused when present);

it builds :func:`hwquant.export.integer_model` and reports, on the **whole test set**: the fake-quant model's
and the integer model's top-1, how many layer-input codes and outputs differ and by how much
(:func:`hwquant.export.compare`), the same for the QDQ ONNX graph in onnxruntime against the integer model
(:func:`hwquant.export.check_onnx`), whether the golden vectors of one image replay exactly
(:func:`hwquant.export.verify`), the widest accumulator, and the time per batch of 256 (interleaved, median of
5) of the FP32 model, the fake-quant model (eval: integer accumulators in float), the integer model and
onnxruntime, as ratios to FP32.

MPQ has no row yet (its bit-exact export is a test, ``tests/methods/test_mpq.py``).  ``--quick``: the small
CNN on digits, two models.
``HWQUANT_EXPORT_TIMING_ONLY=1``: only the timings (7 rounds), for models already built, written to
``export_timing.{json,md}`` (for a re-measurement on a quiet machine without the 40-minute checks).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import float_checkpoint, markdown_table, paired_ratio, time_interleaved, write_results

NAME = "export"
BATCH = 256


def _models(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    if quick:
        return [("GGD PTQ W8A8 (fixed point)", "ptq", {"method": "ggd", "bft": False}),
                ("min-max PTQ W8A8 (float scales)", "ptq", {"method": "minmax"})]
    return [
        ("GGD PTQ W8A8 (fixed point)", "ptq", {"method": "ggd"}),
        ("GGD PTQ W4A4, first/last 8-bit (fixed point)", "ptq", {"method": "ggd", "w_bits": 4, "a_bits": 4,
                                                                  "first_last_bits": 8}),
        ("min-max PTQ W8A8 (float scales)", "ptq", {"method": "minmax"}),
        ("CQAT W5A4 (MSE steps, float scales)", "qat", {"method": "cqat", "_dir": "cqat_w5a4_step-mse"}),
        ("CQAT W5A4 pow2 (fixed point)", "qat", {"method": "cqat", "pow2": True, "_dir": "cqat_w5a4_pow2"}),
    ]


def _build(kind: str, opts: dict[str, Any], ck: Path, quick: bool, runs: Path) -> Path:
    from hwquant.pipelines import PTQOptions, QATOptions, resumable, run_ptq, run_qat

    opts = dict(opts)
    sub = opts.pop("_dir", None)
    if kind == "ptq":
        out = runs / ("ptq_" + "_".join(f"{k}-{v}" for k, v in sorted(opts.items())))
        if not (out / "model.pt").exists():
            run_ptq(PTQOptions(checkpoint=str(ck), out=str(out), progress=False, **opts))
        return out / "model.pt"
    qat_runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_qat_quick" if quick else "bench_qat")
    out = qat_runs / sub
    if not (out / "model.pt").exists():
        run_qat(QATOptions(checkpoint=str(ck), out=str(out), lr=0.005, epochs=1 if quick else 2, resume=resumable(out),
                           progress=False, **opts))
    return out / "model.pt"


def _timings(qmodel, imodel, float_model, x0, repeats: int) -> dict[str, Any]:
    from hwquant.export import to_onnx
    from hwquant.export.onnx import session

    with tempfile.TemporaryDirectory() as d:
        sess, level = session(to_onnx(imodel, Path(d) / "model.onnx"))
        codes = imodel.quantize_input(x0)
        xn = x0.contiguous().numpy()
        with torch.no_grad():
            t = time_interleaved({"fp32": lambda: float_model(x0), "fake-quant": lambda: qmodel(x0),
                                  "integer": lambda: imodel(codes),
                                  "onnxruntime": lambda: sess.run(["logits"], {"input": xn})},
                                 repeats=repeats, warmup=1)
    return {"time_s": {k: v["median_s"] for k, v in t.items()},
            "x_fp32": {k: paired_ratio(v, t["fp32"]) for k, v in t.items() if k != "fp32"}, "onnx_optimize": level}


def timing_only(quick: bool, out_dir=None) -> dict[str, Any]:
    from hwquant.export import integer_model
    from hwquant.pipelines import checkpoint_loaders, load_model

    ck = float_checkpoint(quick, "bench_export_digits")
    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_export_quick" if quick else "bench_export")
    float_model, fck = load_model(ck)
    x0 = next(iter(checkpoint_loaders(fck, None, BATCH).test))[0]
    rows = []
    for name, kind, opts in _models(quick):
        path = _build(kind, opts, ck, quick, runs)
        qmodel, _ = load_model(path)
        imodel = integer_model(qmodel, x0[:1])
        t = _timings(qmodel, imodel, float_model, x0, 3 if quick else 7)
        rows.append({"model": name, **{f"{k} ms": v * 1e3 for k, v in t["time_s"].items()},
                     **{f"{k} x fp32": v for k, v in t["x_fp32"].items()}, "onnx_optimize": t["onnx_optimize"]})
    cols = [(k, k) for k in rows[0]] if rows else []
    md = markdown_table(rows, cols) + (f"\n\nBatch of {BATCH}, interleaved rounds, median of 7; `x fp32`: median "
                                       "per-round ratio to the FP32 model in the same run.\n")
    jp, mp = write_results("export_timing", {"rows": rows}, md, out_dir=out_dir)
    return {"results": {"rows": rows}, "table": md, "json": str(jp), "md": str(mp)}


def _row(name: str, path: Path, quick: bool, float_model, max_images: int | None = None) -> dict[str, Any]:
    """Checks of one quantized checkpoint on the test set (its first ``max_images`` images; ``None``: all)."""
    from hwquant.export import check_onnx, compare, integer_model, to_onnx, verify, write_golden
    from hwquant.pipelines import checkpoint_loaders, load_model

    qmodel, ck = load_model(path)
    loaders = checkpoint_loaders(ck, None, BATCH)
    batches = None if max_images is None else -(-max_images // BATCH)
    x0 = next(iter(loaders.test))[0]
    t0 = time.perf_counter()
    imodel = integer_model(qmodel, x0[:1])
    convert_s = time.perf_counter() - t0
    cmp = compare(qmodel, imodel, loaders.test, max_batches=batches)
    with tempfile.TemporaryDirectory() as d:
        probe = to_onnx(imodel, Path(d) / "probe.onnx", codes_outputs=True)
        ort = check_onnx(probe, imodel, loaders.test, max_batches=batches)
        gold = verify(write_golden(imodel, x0[:1], Path(d) / "golden").parent)
    t = _timings(qmodel, imodel, float_model, x0, 3 if quick else 5)
    level = t["onnx_optimize"]
    layers = imodel.layers()
    return {
        "model": name, "checkpoint": str(path), "images": cmp["images"],
        "top1_fake_quant": cmp["top1_fake_quant"], "top1_integer": cmp["top1_integer"], "top1_onnx": ort["top1_onnx"],
        "codes": cmp["codes"], "codes_diff": cmp["codes_diff"], "max_code_lsb": cmp["max_code_lsb"],
        "out_diff": cmp["out_diff"], "out_elements": cmp["out_elements"], "max_out_abs_diff": cmp["max_abs_diff"],
        "prediction_agree": cmp["prediction_agree"],
        "onnx_codes_diff": ort["codes_diff"], "onnx_max_code_lsb": ort["max_code_lsb"],
        "onnx_max_logit_lsb": ort["max_logit_lsb"], "onnx_optimize": level,
        "golden_ok": gold["ok"], "golden_values": gold["values"],
        "acc_bits_max": max(r["acc_bits"] for r in layers), "convert_s": convert_s,
        "per_layer_codes_diff": {k: v["codes_diff"] for k, v in cmp["layers"].items()},
        "time_s": t["time_s"], "x_fp32": t["x_fp32"],
    }


def table(results: dict[str, Any]) -> str:
    rows = []
    for r in results["rows"]:
        rows.append([
            r["model"], f"{r['top1_fake_quant']:.2f}", f"{r['top1_integer']:.2f}", f"{r['top1_onnx']:.2f}",
            f"{r['codes_diff']} / {r['codes']:.3g} (max {r['max_code_lsb']})",
            f"{r['out_diff']} / {r['out_elements']}",
            f"{r['onnx_codes_diff']} (max {r['onnx_max_code_lsb']}, {r['onnx_optimize']})",
            "pass" if r["golden_ok"] else "FAIL", str(r["acc_bits_max"]),
            f"{r['x_fp32']['fake-quant']:.2f}", f"{r['x_fp32']['integer']:.2f}", f"{r['x_fp32']['onnxruntime']:.2f}",
        ])
    head = ["model", "top-1 fake-quant", "top-1 integer", "top-1 ORT", "codes differ int vs FQ (max LSB)",
            "outputs differ", "ORT codes differ vs int", "golden replay", "acc bits", "FQ x FP32", "int x FP32",
            "ORT x FP32"]
    n = results["rows"][0]["images"] if results["rows"] else 0
    note = (f"{n} test images (the whole test set). `codes differ`: layer-input codes of the integer model that "
            "differ from the fake-quant model's at the same layer (a flip at a rounding tie propagates to later "
            "layers). `outputs differ`: logits not bit-identical. Times: batch of 256, interleaved, median of 5, "
            "as a ratio to the FP32 model (BN unfolded, channels-last) in the same run; the fake-quant model "
            "evaluates on integer accumulators (exact) and the integer model runs int64 requantization.")
    cols = [(str(i), h) for i, h in enumerate(head)]
    md = markdown_table([{str(i): v for i, v in enumerate(r)} for r in rows], cols)
    return md + "\n\n" + note + "\n"


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.pipelines import load_model

    if os.environ.get("HWQUANT_EXPORT_TIMING_ONLY", "0") == "1":
        return timing_only(quick, out_dir)
    ck = float_checkpoint(quick, "bench_export_digits")
    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_export_quick" if quick else "bench_export")
    float_model, _ = load_model(ck)
    rows = []
    for name, kind, opts in _models(quick):
        path = _build(kind, opts, ck, quick, runs)
        row = _row(name, path, quick, float_model)
        rows.append(row)
        print(f"  {name}: FQ {row['top1_fake_quant']:.2f} int {row['top1_integer']:.2f} ORT {row['top1_onnx']:.2f}; "
              f"codes differ {row['codes_diff']}, ORT {row['onnx_codes_diff']}", flush=True)
    results = {"checkpoint": str(ck), "rows": rows,
               "mpq": "not implemented yet: no MPQ issue has landed, so there is no MPQ model to export"}
    md = table(results)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

"""``hwquant demo``: the product's story in one command.

1. FP32 training (or the cached checkpoint under ``--cache``);
2. post-training quantization at W8A8 and at W4A4 with the first conv / last FC at 8 bits, min-max (the
   simple baseline) next to GGD PTQ with backward-forward tuning (fixed point: power-of-two steps);
3. CQAT W5A4 (fixed point) fine-tuned ``--qat-epochs`` (1) of ``--qat-steps`` (150) steps from the FP32
   checkpoint, and ARC (the float model fine-tuned with 8-bit error and weight gradients, ``ARCConfig``'s
   default rounding and clip), next to their FP32 control (the BN-folded float model fine-tuned with the same
   schedule and float gradients); ``--qat-epochs 0`` skips the three;
4. the best fixed-point 4-bit model exported: the integer model against the fake-quant model on
   ``--check-images`` test images (every layer-input code compared), the QDQ ONNX file in onnxruntime with
   its default options against the integer model, golden vectors written and replayed with numpy;
5. bits stored, compression and energy per image (:mod:`hwquant.hw`) for every row, a plot of accuracy
   against stored size, ``report.md`` / ``results.json``, and the HTML report of the exported model
   (``hwquant report``: per-layer SQNR and sensitivity, histograms, accumulator widths).

Every step is the library call behind its own command (``run_ptq``, ``run_qat``, ``run_export``,
``run_report``) writing its own directory under ``--out``, so each row can be inspected or rerun alone.
``--quick``: a small CNN on scikit-learn's digits (12 training epochs, 5 QAT steps, the whole 360-image test
set checked): well under two minutes, what the tests run.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data import resolve_dataset
from ..device import DEVICES
from ..errors import ConfigError
from ..models import list_models
from .common import (
    DATASETS,
    DEVICE_HELP,
    check_choice,
    check_output_dir,
    checkpoint_loaders,
    doc,
    load_model,
    resumable,
    save_config,
    set_threads,
    write_json,
)
from .export import ExportOptions, run_export
from .ptq import PTQOptions, run_ptq
from .qat import QATOptions, run_qat
from .report import ReportOptions, run_report
from .train import TrainOptions, run_train

QUICK = {"model": "small_cnn", "dataset": "digits", "epochs": 12, "batch_size": 64, "check_images": None,
         "report_images": 100, "qat_steps": 5}


@dataclass(frozen=True)
class DemoOptions:
    """``hwquant demo``: FP32, PTQ (min-max and GGD+BFT at W8A8 and W4A4), CQAT W5A4 and ARC G8 next to their FP32
    control, the best 4-bit model exported bit-exactly (integer model, onnxruntime, golden vectors), the
    hardware cost of every row and the report."""

    model: str = field(default="resnet20", metadata=doc("model name"))
    dataset: str = field(default="fashion_mnist", metadata=doc("dataset", DATASETS))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory"))
    epochs: int = field(default=4, metadata=doc("FP32 training epochs"))
    batch_size: int = field(default=128, metadata=doc("training batch size"))
    lr: float = field(default=0.1, metadata=doc("peak learning rate of the FP32 training"))
    seed: int = field(default=0, metadata=doc("seed"))
    qat_epochs: int = field(default=1, metadata=doc(
        "CQAT W5A4, ARC G8 and FP32-control fine-tuning epochs (0: skip)"))
    qat_steps: int | None = field(default=150, metadata=doc(
        "optimizer steps per QAT epoch: the first N batches of each epoch (none: whole epochs)"))
    bft_samples: int = field(default=128, metadata=doc("GGD: calibration images scoring backward-forward tuning"))
    check_images: int | None = field(default=1000, metadata=doc(
        "test images for the integer-model and onnxruntime checks (none: the whole test set)"))
    report_images: int = field(default=256, metadata=doc("held-out images for the report's per-layer measurements"))
    quick: bool = field(default=False, metadata=doc(
        "short version: small_cnn on scikit-learn digits, 12 epochs (replaces model, dataset, epochs, batch "
        "size, check and report images)"))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads"))
    out: str = field(default="runs/demo", metadata=doc("output directory (report.md, results.json, one dir per row)"))
    cache: str = field(default="runs/cache", metadata=doc("where trained float checkpoints are cached"))
    device: str = field(default="auto", metadata=doc(DEVICE_HELP, DEVICES))
    progress: bool = field(default=True, metadata=doc("show progress bars"))

    def __post_init__(self) -> None:
        o = self.effective()
        check_choice("model", o.model, list_models())  # a user's model: hwquant train, then ptq
        TrainOptions(model=o.model, dataset=o.dataset, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                     seed=o.seed, device=o.device)
        if o.qat_epochs < 0:
            raise ConfigError(f"qat_epochs must be >= 0, got {o.qat_epochs}")
        if o.qat_steps is not None and o.qat_steps < 1:
            raise ConfigError(f"qat_steps must be >= 1 or none, got {o.qat_steps}")
        for name in ("bft_samples", "report_images"):
            if getattr(o, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(o, name)}")
        if o.check_images is not None and o.check_images < 1:
            raise ConfigError(f"check_images must be >= 1 or none, got {o.check_images}")

    def effective(self) -> DemoOptions:
        """The options the demo runs with (``quick`` replaces the fields of :data:`QUICK`)."""
        if not self.quick:
            return self
        return replace(self, quick=False, **QUICK)


def _ptq_rows(o: DemoOptions) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, directory, PTQOptions fields)``."""
    ggd = {"method": "ggd", "bft_samples": o.bft_samples}
    return [
        ("min-max PTQ W8A8", "ptq_minmax_w8a8", {"method": "minmax", "w_bits": 8, "a_bits": 8}),
        ("GGD PTQ + BFT W8A8 (fixed point)", "ptq_ggd_w8a8", {**ggd, "w_bits": 8, "a_bits": 8}),
        ("min-max PTQ W4A4, first/last 8-bit", "ptq_minmax_w4a4", {"method": "minmax", "w_bits": 4, "a_bits": 4,
                                                                   "first_last_bits": 8}),
        ("GGD PTQ + BFT W4A4, first/last 8-bit (fixed point)", "ptq_ggd_w4a4", {**ggd, "w_bits": 4, "a_bits": 4,
                                                                                "first_last_bits": 8}),
    ]


def _qat_rows(o: DemoOptions) -> list[tuple[str, str, dict[str, Any]]]:
    if not o.qat_epochs:
        return []
    n = f"{o.qat_epochs} epoch{'s' if o.qat_epochs > 1 else ''}"
    if o.qat_steps is not None:
        n = f"{o.qat_epochs * o.qat_steps} steps" if o.qat_epochs > 1 else f"{o.qat_steps} steps"
    return [
        (f"CQAT W5A4, first/last 8-bit (fixed point), {n}", "qat_cqat_w5a4",
         {"method": "cqat", "w_bits": 5, "a_bits": 4, "pow2": True}),
        (f"FP32 control: BN-folded float model fine-tuned {n}", "qat_fp32", {"method": "fp32"}),
        (f"ARC G8: BN-folded float model fine-tuned {n} with 8-bit gradients", "qat_arc_g8",
         {"method": "fp32", "grad_bits": 8}),
    ]


def run_demo(cfg: DemoOptions) -> dict[str, Any]:
    """Run the demo (see the module docstring); writes OUT/{results.json,report.md,accuracy.png} and one
    directory per row, and returns the results."""
    from ..hw import cost_report
    from ..report import write_demo_report

    t_start = time.perf_counter()
    o = cfg.effective()
    set_threads(o.threads)
    out = check_output_dir(o.out)
    check_output_dir(o.cache, "--cache")
    # step 4 checks the ONNX graph in onnxruntime: say so now, not after the training
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the demo's export step needs {' and '.join(missing)}: pip install 'hwquant[onnx]' "
                          "(make demo installs it)")
    dataset, message = resolve_dataset(o.dataset, o.data_dir, fallback=True)
    if message:
        print(message, flush=True)
    tag = f"{o.model}-{dataset}-e{o.epochs}-b{o.batch_size}-lr{o.lr:g}-s{o.seed}"
    train_dir = Path(o.cache) / tag
    ckpt = train_dir / "model.pt"
    common = {"progress": o.progress, "threads": o.threads, "device": o.device}
    t0 = time.perf_counter()
    if ckpt.exists():
        print(f"[1/5] FP32: using cached float model {ckpt} (delete it to retrain)", flush=True)
        trained_now = False
    else:
        print(f"[1/5] FP32: training {o.model} on {dataset} for {o.epochs} epochs", flush=True)
        run_train(TrainOptions(model=o.model, dataset=dataset, data_dir=o.data_dir if dataset == o.dataset else None,
                               epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, seed=o.seed, out=str(train_dir),
                               resume=resumable(train_dir), **common))
        trained_now = True
    model, ck = load_model(ckpt)
    loaders = checkpoint_loaders(ck, None, 256)
    example = next(iter(loaders.test))[0][:1]

    def cost(m) -> dict[str, float]:  # per image on the default PE array (counts, no timing)
        t = cost_report(m, example)["total"]
        return {"stored_kib": t["stored_bits"] / 8192, "compression": t["compression_ratio"],
                "energy_uj": t["energy_uj"], "w_bits_mean": t["w_bits_mean"]}

    fp32_top1 = ck["metrics"]["top1"]
    rows = [{"row": "FP32", "dir": str(train_dir), "top1": fp32_top1, "top5": ck["metrics"].get("top5"),
             "seconds": time.perf_counter() - t0, "fixed_point": False, **cost(model)}]

    print("[2/5] PTQ: min-max and GGD + backward-forward tuning at W8A8 and W4A4", flush=True)
    for label, sub, opts in _ptq_rows(o):
        t0 = time.perf_counter()
        res = run_ptq(PTQOptions(checkpoint=str(ckpt), out=str(out / sub), **common, **opts))
        q, _ = load_model(out / sub / "model.pt")
        rows.append({"row": label, "dir": str(out / sub), "top1": res["quant"]["top1"], "top5": res["quant"]["top5"],
                     "sqnr_db": res["report"]["sqnr_db"], "seconds": time.perf_counter() - t0,
                     "fixed_point": opts["method"] == "ggd", "a_bits": opts["a_bits"], **cost(q)})

    if o.qat_epochs:
        print(f"[3/5] QAT: CQAT W5A4, ARC G8 and their FP32 control, {o.qat_epochs} epoch(s) each", flush=True)
    else:
        print("[3/5] QAT: skipped (--qat-epochs 0)", flush=True)
    for label, sub, opts in _qat_rows(o):
        t0 = time.perf_counter()
        res = run_qat(QATOptions(checkpoint=str(ckpt), out=str(out / sub), epochs=o.qat_epochs, seed=o.seed,
                                 steps_per_epoch=o.qat_steps, resume=resumable(out / sub), **common, **opts))
        q, _ = load_model(out / sub / "model.pt")
        control = opts["method"] == "fp32" and "grad_bits" not in opts
        arc = "grad_bits" in opts  # a float model trained with quantized gradients: nothing stored changes
        rows.append({"row": label, "dir": str(out / sub), "top1": res["final"]["top1"], "top5": res["final"]["top5"],
                     "start_top1": None if control or arc else res["start"]["top1"],
                     "seconds": time.perf_counter() - t0, "fixed_point": not (control or arc),
                     "a_bits": None if control or arc else opts["a_bits"], "control": control,
                     "grad_bits": opts.get("grad_bits"),
                     **cost(q)})

    best = max((r for r in rows if r["fixed_point"] and r.get("a_bits") == 4), key=lambda r: r["top1"])
    print(f"[4/5] export: {best['row']} -> integer model, onnxruntime, golden vectors", flush=True)
    exp_dir = out / "export"
    t0 = time.perf_counter()
    best_ck = str(Path(best["dir"]) / "model.pt")
    exp = {f: run_export(ExportOptions(checkpoint=best_ck, format=f, out=str(exp_dir), images=o.check_images,
                                       progress=o.progress, threads=o.threads))
           for f in ("int", "onnx", "golden")}
    c, x, g = exp["int"]["compare"], exp["onnx"]["onnx"], exp["golden"]["golden"]
    export = {"row": best["row"], "checkpoint": best_ck, "images": c["images"], "codes": c["codes"],
              "codes_diff": c["codes_diff"], "max_code_lsb": c["max_code_lsb"],
              "top1_fake_quant": c["top1_fake_quant"], "top1_integer": c["top1_integer"],
              "acc_bits_max": exp["int"]["acc_bits_max"], "onnx": x["path"], "onnx_optimize": x["optimize"],
              "onnx_codes_diff": x["codes_diff"], "onnx_max_code_lsb": x["max_code_lsb"],
              "top1_onnx": x["top1_onnx"], "golden": g["manifest"], "golden_ok": g["ok"],
              "bit_exact": c["codes_diff"] == 0 and x["codes_diff"] == 0 and g["ok"],
              "seconds": time.perf_counter() - t0}

    print(f"[5/5] report: cost of every row, accuracy against size, the HTML report of {best['row']}", flush=True)
    rep = run_report(ReportOptions(run_dir=best["dir"], out=str(out / "report"), images=o.report_images,
                                   threads=o.threads))
    sens = rep["report"]["sensitivity"]
    history = ck.get("history", {})
    result = {"model": o.model, "dataset": ck["data"]["dataset"], "source": ck["data"].get("source"),
              "fallback_message": message, "checkpoint": str(ckpt), "trained_now": trained_now, "rows": rows,
              "export": export, "report_html": rep["paths"]["html"],
              "most_sensitive_layer": sens[0]["layer"] if sens else None,
              "history": history.get("epochs", []) if isinstance(history, dict) else [],
              "step_loss": history.get("step_loss", []) if isinstance(history, dict) else [],
              "wall_seconds": time.perf_counter() - t_start}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    save_config(out, cfg)
    report_path = write_demo_report(out, result)
    for r in rows:
        print(f"  {r['row']}: top-1 {r['top1']:.2f}% ({r['top1'] - fp32_top1:+.2f} pt), {r['stored_kib']:.1f} KiB, "
              f"{r['energy_uj']:.2f} uJ/image", flush=True)
    print(f"  export of {best['row']}: {export['codes_diff']} of {export['codes']} codes differ int vs fake quant, "
          f"{export['onnx_codes_diff']} onnxruntime vs int ({export['onnx_optimize']} options), golden "
          f"{'pass' if export['golden_ok'] else 'FAIL'}", flush=True)
    print(f"FP32 top-1 {fp32_top1:.2f}%; {result['wall_seconds']:.0f} s; report: {report_path} and "
          f"{result['report_html']}", flush=True)
    return result

"""MPQ benchmark: the extra level for oscillating weights against uniform precision, where uniform runs out.

Two networks on Fashion-MNIST, each fine-tuned from its own FP32 checkpoint (seed 0) through
``hwquant qat --method mpq`` (:func:`hwquant.pipelines.run_qat`) with the QAT defaults (``HWQUANT_MPQ_EPOCHS``
epochs, default 2, lr 0.005 cosine, gradient norm clipped at 2; first conv / last FC at 8 bits, activations
4-bit min-max EMA, weights on the fixed MSE-calibrated per-channel grid):

* ``resnet20``: the demo's cached 4-epoch checkpoint;
* ``vgg9``: VGG-9 (the paper's network) at width multiplier ``VGG9_WIDTH`` = 0.25 (32-32-64-64-128-128 convs,
  FC 256-256; full width costs 16x the multiply-accumulates, hours per run on two cores), trained here
  4 epochs (``hwquant train`` defaults otherwise).

Runs per network (run directories ``$HWQUANT_BENCH_RUNS/bench_mpq/<model>/<run>_s<seed>``, reused when
present, so an interrupted benchmark resumes), in the order they are made:

* uniform ``W4A4`` (the paper's baseline), ``W2A4``, ``W3A4`` (``max_extra=0, gamma=1``);
* ``MPQ W2(+1)A4`` and ``MPQ W3(+1)A4``: flips counted per optimizer step from 25 % to 50 % of retraining,
  then the weights with at least 2 flips (at most 10 % of a layer) get one more bit, and the learning rate of
  a weight that has flipped is x0.1 within 0.1 steps of a rounding threshold (``lr_scope="flipping"``);
* ablations at 2 bits: the extra bit to as many **random** weights per layer (``--mpq-choose random``), the
  extra bit without the learning-rate rule, the learning-rate rule without the extra bit;
* the other readings of the learning-rate rule: the literal one (every weight near a threshold, all along
  retraining; W2 and W3, two seeds, and alone at W2), only after the flag, and the literal one at eps 0.02;
* uniform W2A4 and MPQ W2(+1)A4 at 4x the learning rate (0.02), where more weights oscillate;
* seed 1 (data order; same FP32 start) of ``W4A4``, both MPQ rows and both literal-rule rows.

Per run: top-1 before (PTQ start) and after, extra-bit share, bits stored (codes + extra-bit index + biases +
scales, :func:`hwquant.hw.cost_report`), compression against FP32 and W4A4, energy per image on the default
reconfigurable 2-bit-brick PE array, and the flip statistics of :func:`hwquant.methods.mpq_summary` (share of
weights that flipped, their mean oscillation frequency, the promoted weights' mean flips, the share the LR
rule slowed per step).  The **bar** (issue 15): an MPQ model >= 1.37x smaller than uniform W4A4, top-1 at
most 0.2 pt below it and at least 0.3 pt above the uniform model nearest in stored size (means over seeds).

``HWQUANT_MPQ_ONLY=resnet20,vgg9:w4`` runs only the listed ``model`` or ``model:run`` entries (other rows
of the earlier results file are kept when their FP32 accuracy is the same); ``HWQUANT_MPQ_FINISHED_ONLY=1``
writes the tables of the runs already finished without training anything.  A results file is written after
every run.  Quick mode: the small CNN on digits, uniform W4A4 and MPQ W3(+1)A4 for one epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from statistics import mean
from typing import Any

from .common import env_int, float_checkpoint, markdown_table, write_results

NAME = "mpq"
VGG9_WIDTH = 0.25
FP32_EPOCHS = 4

_UNIFORM = {"mpq_max_extra": 0.0, "mpq_gamma": 1.0}
_LITERAL = {"mpq_lr_scope": "all"}
# (key, label, QATOptions fields, seeds)
RUNS: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = [
    ("w4", "uniform W4A4", {"w_bits": 4, **_UNIFORM}, (0, 1)),
    ("w2", "uniform W2A4", {"w_bits": 2, **_UNIFORM}, (0,)),
    ("mpq2", "MPQ W2(+1)A4", {"w_bits": 2}, (0, 1)),
    ("w3", "uniform W3A4", {"w_bits": 3, **_UNIFORM}, (0,)),
    ("mpq3", "MPQ W3(+1)A4", {"w_bits": 3}, (0, 1)),
    ("mpq2_random", "W2(+1)A4, extra bit to random weights", {"w_bits": 2, "mpq_choose": "random"}, (0,)),
    ("mpq2_nolr", "W2(+1)A4 without the lr rule", {"w_bits": 2, "mpq_gamma": 1.0}, (0,)),
    ("w2_lr", "W2A4 + lr rule only", {"w_bits": 2, "mpq_max_extra": 0.0}, (0,)),
    # the other readings of the lr rule: the literal one (every weight near a threshold, all along), only
    # after the flag, a narrower band
    ("mpq2_lr_all", "MPQ W2(+1)A4, literal lr rule", {"w_bits": 2, **_LITERAL}, (0, 1)),
    ("mpq3_lr_all", "MPQ W3(+1)A4, literal lr rule", {"w_bits": 3, **_LITERAL}, (0, 1)),
    ("w2_lr_all", "W2A4 + literal lr rule only", {"w_bits": 2, "mpq_max_extra": 0.0, **_LITERAL}, (0,)),
    ("mpq2_lr_after", "MPQ W2(+1)A4, lr rule on every near weight after the flag",
     {"w_bits": 2, "mpq_lr_scope": "after_flag"}, (0,)),
    ("mpq2_eps02", "MPQ W2(+1)A4, literal lr rule at eps 0.02", {"w_bits": 2, "mpq_eps": 0.02, **_LITERAL}, (0,)),
    # a regime with more oscillation: 4x the learning rate
    ("w2_hi", "uniform W2A4 at lr 0.02", {"w_bits": 2, "lr": 0.02, **_UNIFORM}, (0,)),
    ("mpq2_hi", "MPQ W2(+1)A4 at lr 0.02", {"w_bits": 2, "lr": 0.02}, (0,)),
]
MODELS = ("resnet20", "vgg9")
COMPRESSION_BAR, DROP_BAR, GAIN_BAR = 1.37, 0.2, 0.3


def plan(quick: bool) -> list[tuple[str, str, str, dict[str, Any], int]]:
    """``(model, key, label, options, seed)`` in run order: per model, every run's seed 0, then the seed-1 runs."""
    if quick:
        return [("small_cnn", k, lab, o, 0) for k, lab, o, _ in (RUNS[0], RUNS[4])]
    out = []
    for m in MODELS:
        out += [(m, k, lab, o, 0) for k, lab, o, _ in RUNS]
        out += [(m, k, lab, o, s) for k, lab, o, seeds in RUNS for s in seeds if s]
    return out


def _selected(only: str | None, model: str, key: str) -> bool:
    return not only or any(o in (model, f"{model}:{key}") for o in only.split(","))


def _runs_dir(quick: bool) -> Path:
    return Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_mpq_quick" if quick else "bench_mpq")


def _checkpoint(model: str, quick: bool, train: bool = True) -> Path | None:
    """The FP32 checkpoint a network's runs start from (trained here if missing and ``train``)."""
    if model != "vgg9":
        return float_checkpoint(quick, "bench_mpq_digits") if train else _existing_resnet(quick)
    from hwquant.pipelines import TrainOptions, resumable, run_train

    out = _runs_dir(quick) / "vgg9_fp32"
    if not (out / "model.pt").exists():
        if not train:
            return None
        run_train(TrainOptions(model="vgg9", width=VGG9_WIDTH, dataset="fashion_mnist", epochs=FP32_EPOCHS, seed=0,
                               out=str(out), progress=False, resume=resumable(out)))
    return out / "model.pt"


def _existing_resnet(quick: bool) -> Path | None:
    from .common import DEMO_CHECKPOINT

    return DEMO_CHECKPOINT if not quick and DEMO_CHECKPOINT.exists() else None


def _run(model: str, key: str, opts: dict[str, Any], seed: int, ck: Path, quick: bool, train: bool):
    """One run's qat.json (trained unless finished; ``None`` when not finished and not ``train``)."""
    import json

    from hwquant.pipelines import QATOptions, resumable, run_qat

    out = _runs_dir(quick) / model / f"{key}_s{seed}"
    if not (out / "qat.json").exists():
        if not train:
            return None, out
        epochs = 1 if quick else env_int("HWQUANT_MPQ_EPOCHS", 2)
        extra = {"batch_size": 64, "channels_last": False, "mpq_min_flips": 1} if quick else {}
        run_qat(QATOptions(checkpoint=str(ck), method="mpq", a_bits=4, epochs=epochs, seed=seed, out=str(out),
                           resume=resumable(out), progress=False, **extra, **opts))
    return json.loads((out / "qat.json").read_text()), out


def _row(model: str, key: str, label: str, seed: int, rep: dict[str, Any], out: Path, example, fp32) -> dict:
    from hwquant.hw import cost_report
    from hwquant.pipelines import load_model

    qmodel, _ = load_model(out / "model.pt")
    t = cost_report(qmodel, example)["total"]
    mixed = rep.get("mpq") or []
    n = sum(r["weights"] for r in mixed)
    flipping = sum(r["flipping_weights"] for r in mixed)
    extra = sum(r["extra"] for r in mixed)
    steps = max((r["counted_steps"] for r in mixed), default=0)
    return {
        "model": model, "key": key, "run": label, "seed": seed, "fp32_top1": rep["fp32"]["top1"],
        "start_top1": rep["start"]["top1"], "top1": rep["final"]["top1"], "top5": rep["final"]["top5"],
        "extra_pct": 100 * extra / max(1, n), "flipping_pct": 100 * flipping / max(1, n),
        "flip_frequency": (sum(r["flip_frequency_mean"] * r["flipping_weights"] for r in mixed) / flipping
                           if flipping else 0.0),
        "extra_flips_mean": sum(r["extra_flips_mean"] * r["extra"] for r in mixed) / extra if extra else 0.0,
        "slowed_pct": 100 * (sum(r["slowed_share_mean"] * r["weights"] for r in mixed) / n if n else 0.0),
        "counted_steps": steps,
        "w_bits_mixed": sum(r["w_bits_mean"] * r["weights"] for r in mixed) / max(1, n),
        "stored_kib": t["stored_bits"] / 8192, "index_kib": t["index_bits"] / 8192,
        "compression_vs_fp32": t["compression_ratio"], "energy_uj": t["energy_uj"],
        "x_fp32_energy": t["e_total_pj"] / fp32["e_total_pj"], "train_s": rep["train_seconds"],
        "checkpoint": str(out / "model.pt"), "layers": mixed,
    }


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per model and run: the mean over seeds (with spread), compression and energy against uniform W4A4; and
    per model and MPQ run the bar (see the module docstring)."""
    out, bars = [], []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in mine:
            groups.setdefault(r["key"], []).append(r)
        agg = {}
        for key, rs in groups.items():
            top = [r["top1"] for r in rs]
            agg[key] = {**rs[0], "seeds": len(rs), "top1": mean(top), "spread": max(top) - min(top),
                        "start_top1": mean(r["start_top1"] for r in rs),
                        "extra_pct": mean(r["extra_pct"] for r in rs),
                        "stored_kib": mean(r["stored_kib"] for r in rs), "energy_uj": mean(r["energy_uj"] for r in rs)}
        base = agg.get("w4")
        for a in agg.values():
            a["drop_vs_w4a4"] = base["top1"] - a["top1"] if base else None
            a["compression_vs_w4a4"] = base["stored_kib"] / a["stored_kib"] if base else None
            a["x_w4a4_energy"] = a["energy_uj"] / base["energy_uj"] if base else None
            out.append(a)
        uniform = [a for k, a in agg.items() if k in ("w2", "w3", "w4")]
        for key in ("mpq2", "mpq3"):
            if key not in agg or base is None or not uniform:
                continue
            a = agg[key]
            near = min(uniform, key=lambda u: abs(u["stored_kib"] - a["stored_kib"]))
            gain = a["top1"] - near["top1"]
            bars.append({"model": model, "run": a["run"], "seeds": a["seeds"],
                         "compression_vs_w4a4": a["compression_vs_w4a4"], "drop_vs_w4a4": a["drop_vs_w4a4"],
                         "nearest_uniform": near["run"], "nearest_kib": near["stored_kib"], "gain": gain,
                         "met": (a["compression_vs_w4a4"] >= COMPRESSION_BAR and a["drop_vs_w4a4"] <= DROP_BAR
                                 and gain >= GAIN_BAR)})
    return out, bars


def table(results: dict[str, Any]) -> str:
    agg, bars = summarize(results["rows"])
    parts = []
    for model, info in results["models"].items():
        mine = [a for a in agg if a["model"] == model]
        if not mine:
            continue
        parts.append(f"## {model}\n\n{info['label']}: FP32 top-1 {info['fp32_top1']:.2f} %, "
                     f"{info['fp32_kib']:.1f} KiB, {info['fp32_energy_uj']:.1f} uJ/image; fine-tuned "
                     f"{results['epochs']} epochs.\n")
        parts.append(markdown_table(mine, [
            ("run", "run"), ("seeds", "seeds"), ("start_top1", "start top-1"), ("top1", "top-1"),
            ("spread", "spread"), ("drop_vs_w4a4", "drop vs W4A4 (pt)"), ("extra_pct", "extra-bit weights %"),
            ("w_bits_mixed", "mean W bits (low-bit layers)"), ("stored_kib", "stored KiB"),
            ("index_kib", "index KiB"), ("compression_vs_w4a4", "compression vs W4A4"),
            ("energy_uj", "energy uJ/image"), ("x_w4a4_energy", "x W4A4 energy")]))
        parts.append("\nFlip statistics (seed 0; low-bit layers; counted from 25 % to 50 % of retraining):\n")
        parts.append(markdown_table([r for r in results["rows"] if r["model"] == model and r["seed"] == 0], [
            ("run", "run"), ("counted_steps", "counted steps"), ("flipping_pct", "weights that flipped %"),
            ("flip_frequency", "flips per step (flipping weights)"), ("extra_flips_mean", "promoted: mean flips"),
            ("slowed_pct", "slowed by LR rule per step %"), ("train_s", "train s")], digits=4))
    if bars:
        parts.append(f"\n## Bar: >= {COMPRESSION_BAR}x smaller than uniform W4A4, <= {DROP_BAR} pt below it, "
                     f">= {GAIN_BAR} pt above the uniform model nearest in size\n")
        parts.append(markdown_table(bars, [
            ("model", "model"), ("run", "run"), ("seeds", "seeds"), ("compression_vs_w4a4", "compression vs W4A4"),
            ("drop_vs_w4a4", "drop vs W4A4 (pt)"), ("nearest_uniform", "uniform nearest in size"),
            ("gain", "gain over it (pt)"), ("met", "met")]))
    return "\n".join(parts) + "\n"


def _earlier(out_dir) -> dict[str, Any]:
    """The earlier results file's results (``{}`` when there is none or it is of an older layout)."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    try:
        res = json.loads(path.read_text())["results"] if path.exists() else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return res if isinstance(res.get("models"), dict) else {}


def check_settings() -> None:
    """Parse this benchmark's environment settings (``python -m benchmarks.run`` calls it before any work)."""
    env_int("HWQUANT_MPQ_EPOCHS", 2)


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.hw import cost_report
    from hwquant.pipelines import checkpoint_loaders, load_model

    only = None if quick else os.environ.get("HWQUANT_MPQ_ONLY")
    finished_only = not quick and os.environ.get("HWQUANT_MPQ_FINISHED_ONLY") == "1"
    # a partial run keeps the earlier file's other rows, per network while its FP32 accuracy is unchanged
    earlier = _earlier(out_dir) if (only or finished_only) else {}
    todo = [p for p in plan(quick) if _selected(only, p[0], p[1])]
    models: dict[str, dict[str, Any]] = {}
    ctx: dict[str, tuple] = {}
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    epochs = 1 if quick else env_int("HWQUANT_MPQ_EPOCHS", 2)

    def write():
        nonlocal results
        have = {(r["model"], r["key"], r["seed"]) for r in rows}
        info = {m: v for m, v in earlier.get("models", {}).items()
                if m not in models or models[m]["fp32_top1"] == v["fp32_top1"]}
        info.update(models)
        allrows = rows + [r for r in earlier.get("rows", []) if (r["model"], r["key"], r["seed"]) not in have
                          and r["model"] in info and info[r["model"]]["fp32_top1"] == r["fp32_top1"]]
        order = {(m, k, s): i for i, (m, k, _, _, s) in enumerate(plan(quick))}
        allrows.sort(key=lambda r: order.get((r["model"], r["key"], r["seed"]), len(order)))
        results = {"epochs": epochs, "vgg9_width": VGG9_WIDTH, "models": info, "rows": allrows,
                   "bars": summarize(allrows)[1]}
        return write_results(NAME, results, table(results), out_dir=out_dir)

    jp = mp = None
    for model, key, label, opts, seed in todo:
        if model not in ctx:
            ck = _checkpoint(model, quick, train=not finished_only)
            if ck is None:
                continue
            float_model, fck = load_model(ck)
            example = next(iter(checkpoint_loaders(fck, None, 1).test))[0][:1]
            fp32 = cost_report(float_model, example)["total"]
            ctx[model] = (ck, example, fp32)
            models[model] = {"checkpoint": str(ck), "fp32_top1": fck["metrics"]["top1"],
                             "label": (f"VGG-9 width {VGG9_WIDTH}" if model == "vgg9" else
                                       "ResNet-20" if model == "resnet20" else model),
                             "fp32_kib": fp32["stored_bits"] / 8192, "fp32_energy_uj": fp32["energy_uj"]}
        ck, example, fp32 = ctx[model]
        rep, out = _run(model, key, opts, seed, ck, quick, train=not finished_only)
        if rep is None:
            continue
        rows.append(_row(model, key, label, seed, rep, out, example, fp32))
        r = rows[-1]
        print(f"  {model} {label} seed {seed}: {r['start_top1']:.2f} -> {r['top1']:.2f} %, "
              f"{r['stored_kib']:.1f} KiB", flush=True)
        jp, mp = write()
    if jp is None:
        jp, mp = write()
    return {"results": results, "table": table(results), "json": str(jp), "md": str(mp)}

"""ARC gradient quantization: quantizer latency, training-step overhead, and accuracy from scratch.

**Quantizer** (one run, interleaved, medians; ratios to a plain copy into a reused buffer): at 1M / 16M / 64M
float32 elements (a gradient-like normal tensor with a few outliers): hwquant RTZ + z-score, nearest + z-score,
SR + max (fused kernel, counter-based random numbers), RTZ + search per tensor and per sample (128 rows, the
default's error scaling) with a reused code buffer; RTZ + z-score codes and the per-sample float output (what
training consumes) into fresh tensors, next to a copy into a fresh tensor (a fresh 64 MB tensor costs its page
faults, about 3x the copy itself); against the eager torch chains (RTZ: ``mean, std, max, clamp, div, trunc, cast``; SR:
``max, div, rand_like, floor, clamp, cast``).  ``RTZ x SR`` compares hwquant's RTZ with hwquant's SR and with
eager SR.

**Training step**: ResNet-20 (28x28, batch 128, channels-last), FP32 vs the same model with ARC G8 (RTZ,
z-score, first/last float), interleaved, ``x fp32`` = median per-round ratio.

**Accuracy** (skipped in quick mode and when ``HWQUANT_ARC_ACCURACY=0``): ResNet-20 on Fashion-MNIST, two
protocols: from scratch (``HWQUANT_ARC_EPOCHS``, default 2) and fine-tuning the seed-0 FP32 run for
``HWQUANT_ARC_FT_EPOCHS`` (1) epoch at lr 0.005; same seed, data order and epochs within a protocol.  Rows:
FP32, then at G8/G6/G4 SR + max, nearest + max, RTZ + max, RTZ + z-score k = 3 (the literal reading), RTZ with
ARCConfig's default rule, the default with nearest rounding, RTZ + DSGC; seeds 0 and 1 (``HWQUANT_ARC_SEEDS``)
for FP32, SR and the default at 8 bits.  Finished runs are read back (an interrupted benchmark resumes) and the
results file is rewritten after every run;
``HWQUANT_ARC_ONLY=scratch:8`` runs a subset; ``HWQUANT_ARC_LATENCY=0`` keeps the earlier file's latency tables
(an accuracy-only run, which other work on the machine cannot skew); ``HWQUANT_ARC_FINISHED_ONLY=1`` only reads
back finished runs (the tables of a partial benchmark, with fresh latency figures).  The plot ``arc_clip.png``
shows the clip per layer over training: the default rule next to k = 3 and DSGC.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hwquant.methods import ARCConfig, prepare_arc
from hwquant.models import create_model
from hwquant.numerics.gradient import fake_quantize_gradient_rows, quantize_gradient, quantize_gradient_rows

from .common import env_int, env_ints, markdown_table, paired_ratio, time_interleaved, write_results

NAME = "arc"


def _grad(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * 1e-3
    x[:: max(1, n // 1000)] *= 20  # sparse outliers, as gradients have
    return x


def _eager_rtz(g: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    m, s, mx = g.mean(), g.std(), g.abs().max()
    sc = torch.minimum(mx, m.abs() + k * s) / 127
    return torch.clamp(torch.trunc(g / sc), -127, 127).to(torch.int8)


def _eager_sr(g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sc = g.abs().max() / 127
    return torch.clamp(torch.floor(g / sc + torch.rand(g.shape, generator=gen)), -127, 127).to(torch.int8)


def _contenders(g, buf, codes, gen) -> dict[str, Any]:
    return {
        "copy": lambda: buf.copy_(g),
        "hwquant rtz+zscore": lambda: quantize_gradient(g, out=codes),
        "hwquant nearest+zscore": lambda: quantize_gradient(g, rounding="nearest", out=codes),
        "hwquant sr+max": lambda: quantize_gradient(g, rounding="stochastic", clip="max", generator=gen, out=codes),
        "hwquant rtz+search": lambda: quantize_gradient(g, clip="search", out=codes),
        "hwquant rtz+search per sample (128 rows)": lambda: quantize_gradient_rows(
            g.view(128, -1), clip="search", out=codes.view(128, -1)),
        "hwquant nearest+search per sample (128 rows, the default)": lambda: quantize_gradient_rows(
            g.view(128, -1), rounding="nearest", clip="search", out=codes.view(128, -1)),
        "hwquant rtz+zscore (fresh output)": lambda: quantize_gradient(g),
        "copy (fresh output)": lambda: torch.empty_like(g).copy_(g),
        "hwquant rtz+search per sample (fresh float output)": lambda: fake_quantize_gradient_rows(
            g.view(128, -1), clip="search"),
        "eager rtz+zscore": lambda: _eager_rtz(g),
        "eager sr+max": lambda: _eager_sr(g, gen),
    }


def quantizer(quick: bool) -> list[dict[str, Any]]:
    sizes = [1 << 20, 1 << 22] if quick else [1 << 20, 16 << 20, 64 << 20]
    rows = []
    for n in sizes:
        g = _grad(n)
        buf = torch.empty_like(g)
        codes = torch.empty(g.shape, dtype=torch.int8)
        gen = torch.Generator().manual_seed(0)
        fns = _contenders(g, buf, codes, gen)
        t = time_interleaved(fns, repeats=3 if quick else 7, warmup=1)
        for name, st in t.items():
            rows.append({"elements": n, "contender": name, "median_ms": st["median_s"] * 1e3,
                         "x_copy": paired_ratio(st, t["copy"]),
                         "x_hwquant_sr": paired_ratio(st, t["hwquant sr+max"]),
                         "x_eager_sr": paired_ratio(st, t["eager sr+max"])})
    return rows


def train_step(quick: bool) -> dict[str, Any]:
    batch = 32 if quick else 128
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    fp32 = create_model("resnet20", in_channels=1, num_classes=10).to(memory_format=torch.channels_last)
    arc = copy.deepcopy(fp32)
    prepare_arc(arc, ARCConfig(bits=8))
    literal = copy.deepcopy(fp32)
    prepare_arc(literal, ARCConfig(bits=8, rounding="zero", clip="zscore", k=3.0, error_scale="tensor"))
    rtz = copy.deepcopy(fp32)
    prepare_arc(rtz, ARCConfig(bits=8, rounding="zero"))
    models = {"fp32": fp32, "arc g8 default (nearest, search, per sample)": arc,
              "arc g8 rtz, search, per sample": rtz, "arc g8 rtz+zscore k=3 per tensor": literal}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(name):
        def f():
            m, o = models[name], opts[name]
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()
        return f

    t = time_interleaved({k: step(k) for k in models}, repeats=3 if quick else 15, warmup=2 if quick else 3)
    return {"batch": batch, "rows": [{"model": k, "median_ms": v["median_s"] * 1e3,
                                      "x_fp32": paired_ratio(v, t["fp32"])} for k, v in t.items()]}


# the gradient variants of the accuracy table (train/qat options): the baselines quantize per tensor, as in
# the literature; "nearest per sample" is ARCConfig's default, "RTZ per sample" the same with the paper's
# round-toward-zero (the default until 2026-12-03; its runs keep their directories, see _SLUGS)
_T = {"grad_error_scale": "tensor"}
VARIANTS: dict[str, dict[str, Any]] = {
    "SR+max": {"grad_rounding": "stochastic", "grad_quant_clip": "max", **_T},
    "nearest+max": {"grad_rounding": "nearest", "grad_quant_clip": "max", **_T},
    "RTZ+max": {"grad_rounding": "zero", "grad_quant_clip": "max", **_T},
    "RTZ+DSGC": {"grad_rounding": "zero", "grad_quant_clip": "dsgc", **_T},
    "RTZ+zscore k=3 (literal)": {"grad_rounding": "zero", "grad_quant_clip": "zscore", "grad_k": 3.0,
                                 "grad_error_scale": "tensor"},
    "RTZ per sample": {"grad_rounding": "zero"},
    "nearest per sample": {},  # ARCConfig's defaults
}
_SLUGS = {"RTZ per sample": "rtz_default"}  # run directories named before the default changed
_RENAMED = {"RTZ default": "RTZ per sample"}  # rows of earlier results files
BITS = (8, 6, 4)
# FP32, SR and the default at 8 bits: two seeds (HWQUANT_ARC_SEEDS="0,1,2" for more), so the noise is visible
SEEDS_8 = env_ints("HWQUANT_ARC_SEEDS", "0,1")
TWO_SEEDS = ("fp32", "SR+max", "RTZ per sample", "nearest per sample")
PROTOCOLS = {"scratch": "from scratch", "finetune": "fine-tune from the FP32 checkpoint"}
FINETUNE_LR = 0.005


def _epochs() -> dict[str, int]:
    return {"scratch": env_int("HWQUANT_ARC_EPOCHS", 2), "finetune": env_int("HWQUANT_ARC_FT_EPOCHS", 1)}


def check_settings() -> None:
    """Parse this benchmark's environment settings (``python -m benchmarks.run`` calls it before any work)."""
    _epochs()


def plan(seeds: tuple[int, ...] | None = None) -> list[tuple[str, str, int, int]]:
    """``(protocol, variant, bits, seed)`` in the order they run: per protocol what the bar rests on first
    (8 bits, both seeds), then 6 and 4 bits; DSGC (the slowest, 5-7x the others) last of all."""
    out, dsgc = [], []
    for proto in PROTOCOLS:
        seeds_8 = SEEDS_8 if seeds is None else seeds
        out += [(proto, "fp32", 32, s) for s in seeds_8]
        for b in BITS:
            for v in VARIANTS:
                if v == "RTZ+DSGC":
                    dsgc.append((proto, v, b, 0))
                    continue
                out += [(proto, v, b, s) for s in (seeds_8 if b == 8 and v in TWO_SEEDS else (0,))]
    return out + dsgc


def _slug(proto: str, variant: str, bits: int, seed: int) -> str:
    v = _SLUGS.get(variant) or variant.lower().replace(" (literal)", "").replace(" ", "_").replace("+", "-").replace(
        "=", "")
    return f"{proto}_{v}_g{bits}_s{seed}" if variant != "fp32" else f"{proto}_fp32_s{seed}"


def _run_one(proto: str, variant: str, bits: int, seed: int, epochs: dict[str, int], runs_dir: Path):
    from hwquant.pipelines import QATOptions, TrainOptions, resumable, run_qat, run_train

    out = runs_dir / _slug(proto, variant, bits, seed)
    kw = {} if variant == "fp32" else {"grad_bits": bits, **VARIANTS[variant]}
    if proto == "scratch":
        res = run_train(TrainOptions(model="resnet20", dataset="fashion_mnist", epochs=epochs[proto], seed=seed,
                                     out=str(out), resume=resumable(out), progress=False, **kw))
        test = res["test"]
    else:
        base = runs_dir / _slug("scratch", "fp32", 32, 0) / "model.pt"
        res = run_qat(QATOptions(checkpoint=str(base), method="fp32", epochs=epochs[proto], lr=FINETUNE_LR,
                                 seed=seed, out=str(out), resume=resumable(out), progress=False, **kw))
        test = res["final"]
    arc = res.get("arc") or {}
    return {"protocol": proto, "run": variant, "bits": bits, "seed": seed, "cpu": _cpu(), "top1": test["top1"],
            "top5": test["top5"], "train_s": sum(e["seconds"] for e in res["history"]),
            "clip": arc.get("clip"), "error_scale": arc.get("error_scale")}


def _key(r: dict[str, Any]) -> tuple:
    return r["protocol"], r["run"], r["bits"], r["seed"]


def _cpu() -> str:
    """The CPU model the runs were made on: float results are deterministic per machine, not across CPUs."""
    from .common import machine_info

    return str(machine_info()["processor"])


def _selected(only: str | None, proto: str, variant: str, bits: int, seed: int) -> bool:
    """Whether ``HWQUANT_ARC_ONLY`` selects a run: comma-separated ``proto:bits`` prefixes, each optionally
    followed by ``:variant`` (a prefix of the variant's name, e.g. ``scratch:6:RTZ per``).  The FP32 run of
    seed 0 comes with any row of its protocol (the reference every drop is measured from, and the fine-tuning
    start), seed 1 with the protocol's 8-bit rows."""
    return _priority(only, proto, variant, bits, seed) is not None


def _priority(only: str | None, proto: str, variant: str, bits: int, seed: int) -> int | None:
    """The index of the first ``HWQUANT_ARC_ONLY`` entry that selects the run (``None``: not selected; ``0`` for
    every run without a selection): selected runs run in the order of the entries, after the FP32 reference."""
    if not only:
        return 0
    for i, entry in enumerate(only.split(",")):
        parts = entry.strip().split(":", 2)  # proto[:bits[:variant prefix]]
        sel, vprefix = ":".join(parts[:2]), (parts[2] if len(parts) > 2 else "")
        if variant == "fp32":
            if sel.startswith(proto) and (seed == 0 or f"{proto}:8".startswith(sel)):
                return -1
            continue
        if f"{proto}:{bits}".startswith(sel) and variant.startswith(vprefix):
            return i
    return None


def _kept_rows(earlier: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of an earlier results file that this (partial) run did not make.

    Rows made on another CPU are all kept, with their own FP32 reference (each row names its ``cpu``; drops
    are taken against the FP32 run of the same CPU, see :func:`_summarise`).  Rows of this CPU are kept per
    protocol when this run's seed-0 FP32 accuracy equals the earlier one (same code, same data, same CPU: the
    runs are deterministic), or when this run did not retrain it."""
    have = {(_key(r), r["cpu"]) for r in rows}
    cpu = rows[0]["cpu"] if rows else _cpu()
    now = {r["protocol"]: r["top1"] for r in rows if r["run"] == "fp32" and r["seed"] == 0}
    then = {r["protocol"]: r["top1"] for r in earlier if r["run"] == "fp32" and r["seed"] == 0 and r["cpu"] == cpu}
    return [r for r in earlier if (_key(r), r["cpu"]) not in have
            and (r["cpu"] != cpu or now.get(r["protocol"], then.get(r["protocol"])) == then.get(r["protocol"]))]


def _earlier_file(out_dir) -> dict[str, Any]:
    """The earlier results file (``{}`` when there is none)."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    f = json.loads(path.read_text()) if path.exists() else {}
    acc = (f.get("results") or {}).get("accuracy") or {}
    fid = (f.get("results") or {}).get("fidelity") or {}
    for r in acc.get("rows", []) + acc.get("summary", []) + fid.get("rows", []):  # variants renamed since
        r["run"] = _RENAMED.get(r["run"], r["run"])
    return f


def _earlier_rows(out_dir) -> list[dict[str, Any]]:
    """The earlier file's accuracy rows, each with its ``cpu`` (the file's machine for rows that predate it)."""
    f = _earlier_file(out_dir)
    cpu = str((f.get("machine") or {}).get("processor", "unknown"))
    return [{**r, "cpu": r.get("cpu", cpu)}
            for r in ((f.get("results") or {}).get("accuracy") or {}).get("rows", [])]


def accuracy(quick: bool, write=None, out_dir=None) -> dict[str, Any] | None:
    """Every run of :func:`plan` (finished runs are read back, so an interrupted benchmark resumes); ``write``
    is called with the partial result after each run, so a partial table lands on disk.  With
    ``HWQUANT_ARC_ONLY`` the earlier results file's other rows are kept (see :func:`_kept_rows`)."""
    if quick or os.environ.get("HWQUANT_ARC_ACCURACY", "1") == "0":
        return None
    epochs = _epochs()
    only = os.environ.get("HWQUANT_ARC_ONLY")  # e.g. "scratch:8" to run a subset
    finished_only = os.environ.get("HWQUANT_ARC_FINISHED_ONLY") == "1"  # tables of the runs done so far
    runs_dir = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / "bench_arc"
    acc = {"epochs": epochs, "finetune_lr": FINETUNE_LR, "default": _default_rule(), "rows": []}
    earlier = _earlier_rows(out_dir) if only else []
    order = {k: i for i, k in enumerate(plan(tuple(range(10))))}  # table order, whatever seeds this run makes
    made: list[dict[str, Any]] = []

    def merge():
        acc["rows"] = sorted(made + _kept_rows(earlier, made), key=lambda r: order.get(_key(r), len(order)))
        _summarise(acc)

    todo = [(_priority(only, *p), i, p) for i, p in enumerate(plan())]
    for _, _, (proto, variant, bits, seed) in sorted(t for t in todo if t[0] is not None):
        if finished_only and not (runs_dir / _slug(proto, variant, bits, seed) / "model.pt").exists():
            continue
        row = _run_one(proto, variant, bits, seed, epochs, runs_dir)
        made.append(row)
        print(f"  {proto} {variant} G{bits} seed {seed}: {row['top1']:.2f}%", flush=True)
        merge()
        if write is not None:
            write(acc)
    merge()
    remade, kept = {(_key(r), r["cpu"]) for r in made}, _kept_rows(earlier, made)
    dropped = [r for r in earlier if (_key(r), r["cpu"]) not in remade and r not in kept]
    if dropped:  # rows this run neither remade nor kept
        print(f"  {len(dropped)} earlier rows were not kept: their protocol's FP32 run now gives another accuracy",
              flush=True)
    results = Path(os.environ.get("HWQUANT_BENCH_RESULTS", Path(__file__).parent / "results"))
    # the plot needs the 8-bit runs' clip logs; without them an earlier plot stays
    acc["clip_plot"] = _clip_plot(runs_dir, results) or (
        str(results / "arc_clip.png") if only and (results / "arc_clip.png").exists() else None)
    return acc


def _default_rule() -> dict[str, Any]:
    cfg = ARCConfig()
    return {"rounding": cfg.rounding, "clip": cfg.clip, "k": cfg.k, "fraction": cfg.fraction,
            "error_scale": cfg.error_scale}


def _summarise(acc: dict[str, Any]) -> None:
    """Per protocol, variant, bits and CPU: mean over seeds, spread (max - min), drop vs the FP32 mean of the
    same protocol and CPU."""
    groups: dict[tuple, list[float]] = {}
    for r in acc["rows"]:
        groups.setdefault((r["protocol"], r["run"], r["bits"], r.get("cpu", "")), []).append(r["top1"])
    fp32 = {(p, cpu): sum(v) / len(v) for (p, run, _, cpu), v in groups.items() if run == "fp32"}
    summary = []
    for (p, run, bits, cpu), v in groups.items():
        mean = sum(v) / len(v)
        ref = fp32.get((p, cpu))
        summary.append({"protocol": p, "run": run, "bits": bits, "cpu": cpu, "seeds": len(v), "top1_mean": mean,
                        "spread": max(v) - min(v), "drop_vs_fp32": ref - mean if ref is not None else None})
    acc["summary"] = summary


def _arc_kw(bits: int, kw: dict[str, Any]) -> ARCConfig:
    d = ARCConfig()
    return ARCConfig(bits=bits, rounding=kw.get("grad_rounding", d.rounding),
                     clip=kw.get("grad_quant_clip", d.clip), k=kw.get("grad_k", d.k),
                     error_scale=kw.get("grad_error_scale", d.error_scale))


def fidelity(quick: bool, runs_dir: Path) -> dict[str, Any] | None:
    """How far each 8-bit run's weight gradients are from the float ones, by depth, on one real batch.

    For the FP32 model after training (``runs_dir/fp32``, when the accuracy runs have made it) and at
    initialisation: per quantized layer, ``cos(dW, dW_q)`` and the projection ``<dW, dW_q> / |dW|^2`` (1 =
    unbiased magnitude).  The error gradient of a layer is quantized before its backward, so what is lost there
    is lost for every earlier layer too: the first block shows the compounded effect.
    """
    if quick:
        return None
    from hwquant.data import make_loaders
    from hwquant.pipelines import load_model

    loaders = make_loaders("fashion_mnist", batch_size=128, augment=False, seed=0, fallback=False)
    x, y = next(iter(loaders.train))
    with torch.random.fork_rng():  # a seeded initialisation, whatever ran before in this process
        torch.manual_seed(0)
        states = {"init": create_model("resnet20", in_channels=1, num_classes=10)}
    ck = runs_dir / _slug("scratch", "fp32", 32, 0) / "model.pt"
    if ck.exists():
        states["trained (FP32, 2 epochs)"] = load_model(ck)[0]
    rows = []
    for state, m0 in states.items():
        def grads(cfg, m0=m0):
            m = copy.deepcopy(m0).train()
            handle = prepare_arc(m, cfg) if cfg else None
            F.cross_entropy(m(x), y).backward()
            names = handle.layers if handle else None
            return {n: p.grad for n, p in m.named_parameters() if p.dim() > 1}, names

        ref, _ = grads(None)
        for name, kw in VARIANTS.items():
            got, layers = grads(_arc_kw(8, kw))
            picks = {"first block": layers[0], "middle": layers[len(layers) // 2], "last quantized": layers[-1]}
            row = {"state": state, "run": name}
            for where, layer in picks.items():
                a, b = ref[layer + ".weight"].flatten(), got[layer + ".weight"].flatten()
                row[f"{where} cos"] = float(F.cosine_similarity(a, b, dim=0))
                row[f"{where} proj"] = float(a @ b / (a @ a))
            rows.append(row)
    return {"rows": rows}


def _clip_plot(runs_dir: Path, out_dir: Path) -> str | None:
    """Clip value over training per layer (error gradients) of the default rule, z-score k = 3 and DSGC at 8 bits,
    seed 0 -> arc_clip.png (``None`` unless all three runs' clip logs are there)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("nearest per sample", "searched clip per sample (the default)"),
              ("RTZ+zscore k=3 (literal)", "z-score k = 3 (literal)"), ("RTZ+DSGC", "DSGC (error-based)")]
    data = {}
    for run, _ in panels:
        f = runs_dir / _slug("scratch", run, 8, 0) / "arc_clips.json"
        if f.exists():
            data[run] = json.loads(f.read_text())
    if len(data) < len(panels):  # a partial run: the plot of the three rules, or none (an earlier plot stays)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (run, title) in zip(axes, panels, strict=True):
        for layer, kinds in sorted(data.get(run, {}).items()):
            rows = kinds.get("error", [])
            if rows:
                ax.plot([r[0] for r in rows], [r[1] / r[2] for r in rows], lw=0.6, label=layer)
        ax.set_title(f"G8 {title}: clip / max|g|, error gradients", fontsize=9)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("c / max|g|")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "arc_clip.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def table(results: dict[str, Any]) -> str:
    q = markdown_table(results["quantizer"], [("elements", "elements"), ("contender", "contender"),
                                              ("median_ms", "median ms"), ("x_copy", "x copy"),
                                              ("x_hwquant_sr", "x hwquant SR"), ("x_eager_sr", "x eager SR")])
    t = markdown_table(results["train_step"]["rows"], [("model", "model"), ("median_ms", "median ms/step"),
                                                       ("x_fp32", "x fp32")])
    when = (f"Measured {results['latency_measured']} (not rerun with this file's accuracy tables).\n\n"
            if results.get("latency_measured") else "")
    md = f"## Quantizer latency\n\n{when}{q}\n\n## Training step (batch {results['train_step']['batch']})\n\n{t}\n"
    acc = results.get("accuracy")
    if acc and acc.get("summary"):
        d = acc["default"]
        md += (f"\n## Accuracy (ResNet-20, Fashion-MNIST; from scratch {acc['epochs']['scratch']} epochs, fine-tune "
               f"{acc['epochs']['finetune']} epoch at lr {acc['finetune_lr']} from the seed-0 FP32 run)\n\n"
               f"`nearest per sample` = ARCConfig's default: rounding {d['rounding']}, clip {d['clip']}, error steps "
               f"per {d['error_scale']}; `RTZ per sample` = the same with round toward zero (the paper's rounding; "
               "the default before 2026-12-03). Mean over seeds; "
               "spread = max - min; drops against the FP32 run of the same "
               "CPU (float training is deterministic per CPU, not across CPUs)."
               + (f" Measured {acc['measured']} (not rerun with this file's latency tables)." if acc.get("measured")
                  else "") + "\n\n")
        md += markdown_table(acc["summary"], [("protocol", "protocol"), ("run", "run"), ("bits", "G bits"),
                                              ("cpu", "CPU"), ("seeds", "seeds"), ("top1_mean", "top-1"),
                                              ("spread", "spread"), ("drop_vs_fp32", "drop vs FP32 (pt)")]) + "\n"
        md += "\n### Every run\n\n" + markdown_table(acc["rows"], [
            ("protocol", "protocol"), ("run", "run"), ("bits", "G bits"), ("seed", "seed"), ("cpu", "CPU"),
            ("top1", "top-1"), ("top5", "top-5"), ("train_s", "train s")]) + "\n"
    fid = results.get("fidelity")
    if fid:
        cols = [(k, k) for k in fid["rows"][0]]
        when = f"Measured {fid['measured']}.\n\n" if fid.get("measured") else ""
        md += ("\n## Weight-gradient fidelity, 8 bits (one training batch; cos and projection onto the float "
               f"gradient)\n\n{when}{markdown_table(fid['rows'], cols, digits=3)}\n")
    return md


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    earlier = {} if quick else _earlier_file(out_dir)
    before = earlier.get("results") or {}
    if not quick and os.environ.get("HWQUANT_ARC_LATENCY", "1") == "0" and before.get("quantizer"):
        # an accuracy-only run: the latency tables stay as the earlier file measured them, and say so
        results: dict[str, Any] = {
            "quantizer": before["quantizer"], "train_step": before["train_step"],
            "latency_measured": before.get("latency_measured") or earlier["machine"]["utc"]}
    else:
        results = {"quantizer": quantizer(quick), "train_step": train_step(quick)}

    def write(partial_acc):  # after every accuracy run: a partial table on disk
        write_results(NAME, {**results, "accuracy": partial_acc}, table({**results, "accuracy": partial_acc}),
                      out_dir=out_dir)

    results["accuracy"] = accuracy(quick, write, out_dir)
    runs = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / "bench_arc"
    if not quick and results["accuracy"] is None and before.get("accuracy"):
        # what this run did not measure stays as the earlier file measured it, and says so
        results["accuracy"] = {**before["accuracy"], "measured": earlier["machine"]["utc"]}
    trained = (runs / _slug("scratch", "fp32", 32, 0) / "model.pt").exists()
    if not quick and not trained and before.get("fidelity"):  # no trained model here: keep, do not recompute
        results["fidelity"] = {**before["fidelity"],
                               "measured": before["fidelity"].get("measured", earlier["machine"]["utc"])}
    else:
        results["fidelity"] = fidelity(quick, runs)
    md = table(results)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

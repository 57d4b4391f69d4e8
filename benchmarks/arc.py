"""ARC gradient quantization: quantizer latency, training-step overhead, and accuracy from scratch.

**Quantizer** (one run, interleaved, medians; ratios to a plain copy into a reused buffer): at 1M / 16M / 64M
float32 elements (a gradient-like normal tensor with a few outliers): hwquant RTZ + z-score, nearest + z-score,
SR + max (fused kernel, counter-based random numbers) with a reused code buffer, and RTZ + z-score into a
fresh tensor; against the eager torch chains (RTZ: ``mean, std, max, clamp, div, trunc, cast``; SR:
``max, div, rand_like, floor, clamp, cast``).  ``RTZ x SR`` compares hwquant's RTZ with hwquant's SR and with
eager SR.

**Training step**: ResNet-20 (28x28, batch 128, channels-last), FP32 vs the same model with ARC G8 (RTZ,
z-score, first/last float), interleaved, ``x fp32`` = median per-round ratio.

**Accuracy** (skipped in quick mode and when ``HWQUANT_ARC_ACCURACY=0``): ResNet-20 on Fashion-MNIST from
scratch, same seed, data order and epochs (``HWQUANT_ARC_EPOCHS``, default 2): FP32; G8/G6/G4 with RTZ +
z-score, SR + max, nearest + max, RTZ + DSGC.  The RTZ + z-score and DSGC runs record their clip values; the
plot ``arc_clip.png`` shows the clip per layer over training.
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
from hwquant.numerics.gradient import quantize_gradient

from .common import markdown_table, paired_ratio, time_interleaved, write_results

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
        "hwquant rtz+zscore (fresh output)": lambda: quantize_gradient(g),
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
    models = {"fp32": fp32, "arc g8 rtz+zscore": arc}
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


RUNS = [("fp32", None)] + [
    (f"g{b} {name}", {"grad_bits": b, **kw})
    for b in (8, 6, 4)
    for name, kw in (("rtz+zscore", {"grad_rounding": "zero", "grad_quant_clip": "zscore"}),
                     ("sr+max", {"grad_rounding": "stochastic", "grad_quant_clip": "max"}),
                     ("nearest+max", {"grad_rounding": "nearest", "grad_quant_clip": "max"}),
                     ("rtz+dsgc", {"grad_rounding": "zero", "grad_quant_clip": "dsgc"}))
] + [  # where the z-score rule loses accuracy: the clip (k) vs the rounding, and error vs weight gradients
    ("g8 nearest+zscore", {"grad_bits": 8, "grad_rounding": "nearest", "grad_quant_clip": "zscore"}),
    ("g8 rtz+zscore k=6", {"grad_bits": 8, "grad_rounding": "zero", "grad_quant_clip": "zscore", "grad_k": 6.0}),
    ("g8 rtz+zscore k=10", {"grad_bits": 8, "grad_rounding": "zero", "grad_quant_clip": "zscore", "grad_k": 10.0}),
    ("g8 rtz+zscore weight grads only", {"grad_bits": 8, "grad_rounding": "zero", "grad_quant_clip": "zscore",
                                         "grad_error": False}),
]


def accuracy(quick: bool) -> dict[str, Any] | None:
    if quick or os.environ.get("HWQUANT_ARC_ACCURACY", "1") == "0":
        return None
    from hwquant.pipelines import TrainOptions, resumable, run_train

    epochs = int(os.environ.get("HWQUANT_ARC_EPOCHS", "2"))
    runs_dir = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / "bench_arc"
    rows = []
    for name, kw in RUNS:
        out = runs_dir / name.replace(" ", "_").replace("+", "-")
        opts = TrainOptions(model="resnet20", dataset="fashion_mnist", epochs=epochs, out=str(out),
                            resume=resumable(out), progress=False, **(kw or {}))
        res = run_train(opts)
        rows.append({"run": name, "bits": kw["grad_bits"] if kw else 32, "top1": res["test"]["top1"],
                     "top5": res["test"]["top5"],  # epoch times from the history: right also for resumed runs
                     "train_s": sum(e["seconds"] for e in res["history"])})
        print(f"  {name}: {res['test']['top1']:.2f}%", flush=True)
    fp32 = rows[0]["top1"]
    for r in rows:
        r["drop_vs_fp32"] = fp32 - r["top1"]
    plot = _clip_plot(runs_dir, Path(os.environ.get("HWQUANT_BENCH_RESULTS", Path(__file__).parent / "results")))
    return {"epochs": epochs, "rows": rows, "clip_plot": plot}


def _arc_kw(kw: dict[str, Any]) -> ARCConfig:
    return ARCConfig(bits=kw["grad_bits"], rounding=kw["grad_rounding"], clip=kw["grad_quant_clip"],
                     k=kw.get("grad_k", 3.0), error_grad=kw.get("grad_error", True))


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
    states = {"init": create_model("resnet20", in_channels=1, num_classes=10)}
    ck = runs_dir / "fp32" / "model.pt"
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
        for name, kw in RUNS:
            if not kw or kw["grad_bits"] != 8:
                continue
            got, layers = grads(_arc_kw(kw))
            picks = {"first block": layers[0], "middle": layers[len(layers) // 2], "last quantized": layers[-1]}
            row = {"state": state, "run": name}
            for where, layer in picks.items():
                a, b = ref[layer + ".weight"].flatten(), got[layer + ".weight"].flatten()
                row[f"{where} cos"] = float(F.cosine_similarity(a, b, dim=0))
                row[f"{where} proj"] = float(a @ b / (a @ a))
            rows.append(row)
    return {"rows": rows}


def _clip_plot(runs_dir: Path, out_dir: Path) -> str | None:
    """Clip value over training per layer (error gradients), z-score vs DSGC at 8 bits -> arc_clip.png."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("g8 rtz+zscore", "z-score (k = 3)"), ("g8 rtz+dsgc", "DSGC (error-based)")]
    data = {}
    for run, _ in panels:
        f = runs_dir / run.replace(" ", "_").replace("+", "-") / "arc_clips.json"
        if f.exists():
            data[run] = json.loads(f.read_text())
    if not data:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4), sharey=True)
    for ax, (run, title) in zip(axes, panels, strict=True):
        for layer, kinds in sorted(data.get(run, {}).items()):
            rows = kinds.get("error", [])
            if rows:
                ax.plot([r[0] for r in rows], [r[1] / r[2] for r in rows], lw=0.6, label=layer)
        ax.set_title(f"{title}: clip / max|g|, error gradients")
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
    md = f"## Quantizer latency\n\n{q}\n\n## Training step (batch {results['train_step']['batch']})\n\n{t}\n"
    acc = results.get("accuracy")
    if acc:
        a = markdown_table(acc["rows"], [("run", "run"), ("bits", "G bits"), ("top1", "top-1"), ("top5", "top-5"),
                                         ("drop_vs_fp32", "drop vs FP32 (pt)"), ("train_s", "train s")])
        md += f"\n## Accuracy from scratch ({acc['epochs']} epochs, same seed)\n\n{a}\n"
    fid = results.get("fidelity")
    if fid:
        cols = [(k, k) for k in fid["rows"][0]]
        md += ("\n## Weight-gradient fidelity, 8 bits (one training batch; cos and projection onto the float "
               f"gradient)\n\n{markdown_table(fid['rows'], cols, digits=3)}\n")
    return md


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"quantizer": quantizer(quick), "train_step": train_step(quick)}
    results["accuracy"] = accuracy(quick)
    results["fidelity"] = fidelity(quick, Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / "bench_arc")
    md = table(results)
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}

"""Training-step time of ResNet-20: FP32 vs hwquant fake-quant W8A8 vs W4A4 (QAT overhead).

Setup: ``create_model("resnet20", in_channels=1, num_classes=10)``, 28x28 inputs, batch 128 (32 in quick
mode), model and input in ``channels_last``, SGD (lr 0.01, momentum 0.9).  One step is
``zero_grad -> forward -> cross_entropy -> backward -> step`` on a fixed random batch.

The quantized models are built with :func:`hwquant.nn.quantize_model` from a copy of the same float
weights: ``QuantRecipe()`` (default ``LayerQuant``: weights 8-bit signed per output channel, input
activations 8-bit per tensor with the sign decided at calibration) and a 4-bit variant of the same recipe.
Each is calibrated with :func:`hwquant.nn.calibrate` on one random batch so every quantizer is enabled,
then trained like the float model.

The three models are stepped **interleaved** (FP32, W8A8, W4A4, FP32, ...) so a slow spell of the shared
machine hits all of them; ``x fp32`` is the median over rounds of ``t_qat / t_fp32`` within the run.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hwquant.models import create_model
from hwquant.nn import LayerQuant, QuantRecipe, calibrate, quantize_model
from hwquant.spec import QuantSpec

from .common import loadavg, markdown_table, paired_ratio, time_interleaved, write_results

NAME = "train_step"
IMAGE = 28
LR, MOMENTUM = 0.01, 0.9

W4A4 = QuantRecipe(
    default=LayerQuant(
        weight=QuantSpec(bits=4, signed=True, granularity="channel"),
        act=QuantSpec(bits=4, signed=None, granularity="tensor"),
    )
)


def _plan(quick: bool) -> dict[str, int]:
    if quick:
        return {"batch": 32, "warmup": 1, "repeats": 3}
    return {"batch": 128, "warmup": 3, "repeats": 15}


def _models(x: torch.Tensor) -> dict[str, torch.nn.Module]:
    """FP32, W8A8 and W4A4 ResNet-20s with identical starting weights, channels_last, in train mode."""
    torch.manual_seed(0)
    fp32 = create_model("resnet20", in_channels=1, num_classes=10)
    models = {"fp32": fp32}
    for name, recipe in (("hwquant w8a8", QuantRecipe()), ("hwquant w4a4", W4A4)):
        q = quantize_model(copy.deepcopy(fp32), recipe)
        calibrate(q, [x])
        models[name] = q
    for m in models.values():
        # quantize_model builds fresh (contiguous) layers, so set the memory format after the swap.
        m.to(memory_format=torch.channels_last)
        m.train()
    return models


def _stepper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def measure(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns ``{"config", "rows": [one row per model]}``."""
    load_before = loadavg()
    plan = _plan(quick)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(plan["batch"], 1, IMAGE, IMAGE, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (plan["batch"],), generator=g)
    models = _models(x)
    n_quant = {
        name: sum(1 for mod in m.modules() if getattr(mod, "enabled", False)) for name, m in models.items()
    }
    steps = {name: _stepper(m, x, y) for name, m in models.items()}
    stats = time_interleaved(steps, repeats=plan["repeats"], warmup=plan["warmup"])
    base = stats["fp32"]
    rows = [
        {
            "model": name,
            "median_ms": st["median_s"] * 1e3,
            "min_ms": st["min_s"] * 1e3,
            "x_fp32": paired_ratio(st, base),
            "x_fp32_of_medians": st["median_s"] / base["median_s"],
            "images_per_s": plan["batch"] / st["median_s"],
            "enabled_quantizers": n_quant[name],
            "steps": len(st["runs"]),
        }
        for name, st in stats.items()
    ]
    return {
        "config": {
            "quick": quick,
            "loadavg_before": load_before,
            "model": "resnet20",
            "in_channels": 1,
            "num_classes": 10,
            "input": [plan["batch"], 1, IMAGE, IMAGE],
            "memory_format": "channels_last",
            "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})",
            "warmup_rounds": plan["warmup"],
            "timed_rounds": plan["repeats"],
            "order": "interleaved: " + ", ".join(steps),
            "ratio_method": "median over interleaved rounds of t_model / t_fp32",
        },
        "rows": rows,
    }


def table(results: dict[str, Any]) -> str:
    """Markdown for the results."""
    cfg = results["config"]
    t = markdown_table(
        results["rows"],
        [
            ("model", "model"),
            ("median_ms", "median ms/step"),
            ("min_ms", "min ms/step"),
            ("images_per_s", "images/s"),
            ("x_fp32", "x fp32"),
            ("enabled_quantizers", "quantizers on"),
        ],
    )
    b = cfg["input"]
    return "\n".join(
        [
            f"ResNet-20 training step (forward, cross-entropy, backward, SGD momentum {MOMENTUM}), "
            f"batch {b[0]}, {b[1]}x{b[2]}x{b[3]} input, channels_last; {cfg['timed_rounds']} interleaved "
            "rounds after warmup.",
            "`x fp32`: median over rounds of t_model / t_fp32 (same run).",
            f"Load average (1/5/15 min) before the run: {cfg['loadavg_before']}.",
            "",
            t,
        ]
    )


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    """Measure, write ``train_step.{json,md}`` and return ``{"results", "table", "json", "md"}``."""
    results = measure(quick)
    md = table(results)
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}

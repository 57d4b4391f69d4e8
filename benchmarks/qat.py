"""QAT benchmark: CQAT against the QAT baselines (accuracy) and the cost of a QAT training step (speed).

Part 1, ``speed``: ResNet-20 training step (forward, cross-entropy, backward, SGD momentum 0.9), batch 128
(32 in quick mode), 28x28x1 input, channels_last, a fixed random batch.  Contenders, stepped **interleaved**
(one step of each per round) so a slow spell of the shared machine hits all alike:

* ``fp32``: the float model with BatchNorm folded (the structure every QAT model trains);
* ``hwquant cqat w5a4``: :func:`hwquant.prepare_qat` with ``CQATConfig()`` (fused C kernel: one pass writes
  the output and the STE mask, the backward is one pass over gradient and mask; the ReLUs that only feed
  quantized layers are absorbed by their input quantizers, and one that also feeds the shortcut add is fused
  with its quantizer, :func:`hwquant.nn.absorb_relus`);
* ``hwquant cqat w5a4, ReLUs not absorbed``: the same with ``absorb_relu=False`` (a ReLU pass and a quantizer
  pass per activation, forward and backward, and autograd's sum where the ReLU has two readers; the same
  values and gradients bit for bit);
* ``hwquant cqat w5a4, static activation steps``: ``act_range="static"``, the calibrated activation steps kept:
  no peak pass over each activation (what CQAT's EMA of the batch peak costs);
* ``hwquant cqat w5a4 (torch ops)``: the same model on hwquant's torch-op path (kernel switched off);
* ``hwquant cqat w5a4, weights only`` / ``activations only``: the same model with only one kind of quantizer
  on (where the cost over FP32 comes from);
* ``fp32 + a copy per layer input (floor)``: the float model with a copy of each conv / linear input forward
  and of its gradient backward: the least an activation quantizer that is a pass of its own (one each way)
  can cost; an absorbed ReLU's pass is the quantizer's, so CQAT can go below it;
* ``naive ste``: the textbook ``x + (clamp(round(x / s)) * s - x).detach()`` on weights and inputs;
* ``torch fake_quantize``: ``torch.fake_quantize_per_channel_affine`` (weights) and ``_per_tensor_affine``
  (inputs);
* ``brevitas w5a4``: ``QuantConv2d`` / ``QuantLinear`` / ``QuantIdentity`` with 5-bit weights and 4-bit inputs,
  if brevitas is installed (``pip install brevitas``; not a dependency of hwquant);
* per-call cost: ``fp32`` and ``hwquant cqat w5a4`` again at batch 2, where the memory passes are negligible: the
  difference is the Python, dispatch and autograd cost of the quantizers, paid per step whatever the batch;
* ``torch.compile(...)`` of the naive model and of hwquant's CQAT model (inductor, ``dynamic=False``; under
  compilation hwquant uses its torch-op path, which inductor fuses); the first three steps, which compile,
  are timed separately (``first 3 steps s``).

The naive and torch contenders quantize the same tensors as CQAT (per-channel weights, per-tensor inputs)
with the same steps, so only the implementation differs.  ``x fp32`` is the median over rounds of
``t / t_fp32``.

Part 2, ``accuracy``: Fashion-MNIST ResNet-20 (the demo's cached 4-epoch checkpoint, trained if missing),
every run fine-tuned from it with the same seed, epochs, schedule and data order, through ``hwquant qat``
(:func:`hwquant.pipelines.run_qat`) with its defaults (lr 0.005 cosine, gradient norm clipped at 2): an FP32
control (the BN-folded float model fine-tuned with the same schedule); at W5A4 and W4A4: CQAT as a bit window of
the 8-bit min-max quantizer (``step=window``: codes = the 8-bit codes shifted right by a per-layer shift) and
with the calibrated step (``step=mse``), STE, PACT and LSQ; CQAT W5A4 with the literal step (``step=max``) last.
First conv and last FC at 8 bits for every quantized run.  Reported:
test top-1 before fine-tuning (the PTQ starting point) and after, the drop against the FP32 control and
against the original checkpoint, training time, and the loss curves (``qat_loss.png``).  Quick mode runs two
short runs on the small CNN / digits.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hwquant as hq
from hwquant.errors import DataError
from hwquant.models import create_model
from hwquant.nn import fold_batchnorm, quant_layers
from hwquant.numerics import native, uniform

from .common import env_int, float_checkpoint, loadavg, markdown_table, paired_ratio, time_interleaved, write_results

NAME = "qat"
IMAGE = 28
LR, MOMENTUM = 0.01, 0.9  # speed part
QAT_LR = 0.005  # accuracy part: the hwquant qat default
FIXED_BATCH = 2  # speed part: the batch at which a step's per-call cost is measured


# ----------------------------------------------------------------------------- reference QAT layers (speed)
class _RefQuant(nn.Module):
    """Wraps a conv/linear: fake-quantizes its input (per tensor) and weight (per channel) with ``kind``."""

    def __init__(self, layer: nn.Module, kind: str, s_in: float, in_range: tuple[int, int], w_bits: int):
        super().__init__()
        self.layer, self.kind = layer, kind
        self.s_in, (self.in_lo, self.in_hi) = s_in, in_range
        self.w_hi = 2 ** (w_bits - 1) - 1
        self.w_lo = -self.w_hi - 1

    def _w_scale(self, w: torch.Tensor) -> torch.Tensor:
        return (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.w_hi).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        sw = self._w_scale(w)
        shape = [-1] + [1] * (w.dim() - 1)
        if self.kind == "naive":
            qx = torch.clamp(torch.round(x / self.s_in), self.in_lo, self.in_hi) * self.s_in
            x = x + (qx - x).detach()
            qw = torch.clamp(torch.round(w / sw.view(shape)), self.w_lo, self.w_hi) * sw.view(shape)
            w = w + (qw - w).detach()
        else:
            x = torch.fake_quantize_per_tensor_affine(x, self.s_in, 0, self.in_lo, self.in_hi)
            zp = torch.zeros(sw.numel(), dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(w, sw, zp, 0, self.w_lo, self.w_hi)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


def _reference_model(qat_model: nn.Module, float_model: nn.Module, kind: str) -> nn.Module:
    """``float_model`` with each layer wrapped in :class:`_RefQuant`, using ``qat_model``'s bits and steps."""
    ref = copy.deepcopy(float_model)
    for name, layer in quant_layers(qat_model):
        aq = layer.input_quant
        lo, hi = aq.params().qmin, aq.params().qmax
        parent_name, _, child = name.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        setattr(parent, child, _RefQuant(getattr(parent, child), kind, float(aq.scale), (lo, hi),
                                         layer.weight_quant.spec.bits))
    return ref


def _brevitas_model(float_model: nn.Module) -> nn.Module | None:
    """A W5A4 Brevitas twin of the folded ResNet-20 (first/last 8-bit), or ``None`` if brevitas is missing."""
    try:
        import brevitas.nn as qnn
    except Exception:  # noqa: BLE001 - optional reference point
        return None
    ref = copy.deepcopy(float_model)
    layers = [(n, m) for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, (name, m) in enumerate(layers):
        edge = i in (0, len(layers) - 1)
        wb, ab = (8, 8) if edge else (5, 4)
        if isinstance(m, nn.Conv2d):
            q = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                bias=m.bias is not None, weight_bit_width=wb)
        else:
            q = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, weight_bit_width=wb)
        q.load_state_dict(m.state_dict(), strict=False)
        act = qnn.QuantIdentity(bit_width=ab, return_quant_tensor=False)
        parent_name, _, child = name.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        setattr(parent, child, nn.Sequential(act, q))
    return ref


def _stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor, torch_ops: bool = False):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step() -> float:
        saved = native.STATE["state"]
        if torch_ops:
            native.STATE["state"] = "failed"  # hwquant's torch-op path for this step only
        try:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        finally:
            native.STATE["state"] = saved
        return loss.item()

    return step


def _only_quantizers(qmodel: nn.Module, weights: bool) -> nn.Module:
    """A copy of ``qmodel`` with only its weight (``weights``) or only its activation quantizers on: where the
    QAT step's cost over FP32 comes from."""
    m = copy.deepcopy(qmodel)
    for name, q in m.named_modules():
        if isinstance(q, hq.nn.FakeQuantizer):
            q.enabled = q.enabled and name.endswith("weight_quant") == weights
    return m


class _CopySTE(torch.autograd.Function):
    """One pass forward (a copy) and one pass backward (a copy of the gradient): the least an eager activation
    quantizer with a straight-through gradient can cost."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return x.clone(memory_format=torch.preserve_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(memory_format=torch.preserve_format)


def _copy_floor(float_model: nn.Module) -> nn.Module:
    """A copy of the float model with :class:`_CopySTE` on the input of every conv / linear layer (where CQAT has
    its activation quantizers)."""
    m = copy.deepcopy(float_model)
    for layer in m.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.register_forward_pre_hook(lambda _mod, args: (_CopySTE.apply(args[0]), *args[1:]))
    return m


def speed(quick: bool) -> dict[str, Any]:
    load_before = loadavg()
    batch, warmup, repeats = (32, 1, 3) if quick else (128, 3, 15)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, IMAGE, IMAGE, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    float_model = fold_batchnorm(create_model("resnet20", in_channels=1, num_classes=10))
    cqat = hq.prepare_qat(float_model, hq.CQATConfig(), [x])
    models: dict[str, tuple[nn.Module, bool]] = {
        "fp32": (copy.deepcopy(float_model), False),
        "hwquant cqat w5a4": (cqat, False),
        "hwquant cqat w5a4, ReLUs not absorbed": (hq.prepare_qat(float_model, hq.CQATConfig(absorb_relu=False),
                                                                 [x]), False),
        "hwquant cqat w5a4, static activation steps": (hq.prepare_qat(float_model, hq.CQATConfig(act_range="static"),
                                                                      [x]), False),
        "hwquant cqat w5a4 (torch ops)": (copy.deepcopy(cqat), True),
        "hwquant cqat w5a4, weights only": (_only_quantizers(cqat, weights=True), False),
        "hwquant cqat w5a4, activations only": (_only_quantizers(cqat, weights=False), False),
        "fp32 + a copy per layer input (floor)": (_copy_floor(float_model), False),
        "naive ste": (_reference_model(cqat, float_model, "naive"), False),
        "torch fake_quantize": (_reference_model(cqat, float_model, "torch"), False),
    }
    brev = _brevitas_model(float_model)
    if brev is not None:
        models["brevitas w5a4"] = (brev, False)
    for m, _ in models.values():
        m.to(memory_format=torch.channels_last).train()
    compile_s = {}
    if not quick:  # torch.compile (inductor, static shapes): the first steps compile, timed separately
        for name, src in (("torch.compile(naive ste)", "naive ste"), ("torch.compile(hwquant cqat w5a4)",
                                                                       "hwquant cqat w5a4")):
            m = torch.compile(copy.deepcopy(models[src][0]), dynamic=False)
            step = _stepper(m, x, y)
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            compile_s[name] = time.perf_counter() - t0
            models[name] = (m, False)
    steps = {name: _stepper(m, x, y, torch_ops) for name, (m, torch_ops) in models.items()}
    stats = time_interleaved(steps, repeats=repeats, warmup=warmup)
    base = stats["fp32"]
    rows = [{"model": name, "median_ms": st["median_s"] * 1e3, "min_ms": st["min_s"] * 1e3,
             "x_fp32": paired_ratio(st, base), "images_per_s": batch / st["median_s"],
             "first_steps_s": compile_s.get(name)} for name, st in stats.items()]
    # the per-call cost (Python, dispatch, autograd nodes): the same two models at a batch of 2, where the memory
    # passes are negligible, so the difference is what a QAT step costs whatever the batch
    small = {name: _stepper(models[name][0], x[:FIXED_BATCH], y[:FIXED_BATCH])
             for name in ("fp32", "hwquant cqat w5a4")}
    st_small = time_interleaved(small, repeats=2 * repeats, warmup=warmup)
    f_ms, q_ms = (st_small[n]["median_s"] * 1e3 for n in small)
    fixed = {"batch": FIXED_BATCH, "rounds": 2 * repeats, "fp32_ms": f_ms, "cqat_ms": q_ms, "extra_ms": q_ms - f_ms,
             "of_fp32_step": (q_ms - f_ms) / (base["median_s"] * 1e3)}
    return {"batch": batch, "rounds": repeats, "loadavg_before": load_before, "native": uniform.native_status(),
            "brevitas": brev is not None, "rows": rows, "fixed": fixed}


# ----------------------------------------------------------------------------- accuracy
RUNS = [  # name, QAT options; in the order they run: what the bars rest on first (a partial table lands after each)
    ("fp32 control", {"method": "fp32"}),
    ("cqat w5a4 (step=window, fixed point)", {"method": "cqat", "step": "window", "pow2": True}),
    ("cqat w5a4 (step=mse)", {"method": "cqat", "step": "mse"}),
    ("cqat w4a4 (step=window, fixed point)", {"method": "cqat", "step": "window", "pow2": True, "w_bits": 4}),
    ("cqat w4a4 (step=mse)", {"method": "cqat", "step": "mse", "w_bits": 4}),
    ("ste w5a4", {"method": "ste"}),
    ("pact w5a4", {"method": "pact"}),
    ("lsq w5a4", {"method": "lsq"}),
    ("ste w4a4", {"method": "ste", "w_bits": 4}),
    ("pact w4a4", {"method": "pact", "w_bits": 4}),
    ("lsq w4a4", {"method": "lsq", "w_bits": 4}),
    ("cqat w5a4 (step=max, literal)", {"method": "cqat", "step": "max"}),
]
EXPORTED = ("cqat w5a4 (step=window, fixed point)",)  # integer model and ONNX checked on the test images
EXPORT_IMAGES = 1000


def _selected(only: str | None, name: str) -> bool:
    """Whether ``HWQUANT_QAT_ONLY`` (comma-separated prefixes of run names) selects a run; the FP32 control,
    which every drop is measured from, always runs."""
    return not only or name == "fp32 control" or any(name.startswith(o.strip()) for o in only.split(","))


def _earlier_rows(out_dir) -> list[dict[str, Any]]:
    """The earlier ``qat.json``'s accuracy rows, each with its ``cpu`` (the file's machine for older rows)."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    if not path.exists():
        return []
    f = json.loads(path.read_text())
    cpu = str((f.get("machine") or {}).get("processor", ""))
    return [{**r, "cpu": r.get("cpu", cpu)} for r in ((f.get("results") or {}).get("accuracy") or {}).get("rows", [])]


def _kept(earlier: list[dict[str, Any]], rows: list[dict[str, Any]], cpu: str) -> list[dict[str, Any]]:
    """Earlier rows this (partial) run did not make.  Rows of another CPU are kept with their own FP32 control
    and checkpoint (float training is deterministic per CPU, not across CPUs; each row names its ``cpu`` and its
    drops are taken within it); rows of this CPU when they come from the same checkpoint (its test top-1) and
    the same FP32 control as this run's."""
    have = {(r["run"], r["cpu"]) for r in rows}
    ctl = next((r.get("top1") for r in rows if r["run"] == "fp32 control"), None)
    ctl_then = next((r.get("top1") for r in earlier if r["run"] == "fp32 control" and r.get("cpu") == cpu), None)
    ck = next((r.get("checkpoint_top1") for r in rows if "checkpoint_top1" in r), None)
    return [r for r in earlier if (r["run"], r.get("cpu")) not in have and (
        r.get("cpu") != cpu or (ctl is not None and ctl == ctl_then and r.get("checkpoint_top1") == ck))]


def _checkpoint(quick: bool) -> Path:
    return float_checkpoint(quick, "bench_qat_digits")


def accuracy(quick: bool, write=None, out_dir=None) -> dict[str, Any]:
    """Every run of :data:`RUNS` (finished runs are read back, so an interrupted benchmark resumes); ``write`` is
    called with the partial result after each run, so a partial table lands on disk.  ``HWQUANT_QAT_ONLY``
    runs a subset (prefixes of run names) and keeps the earlier file's other rows (see :func:`_kept`)."""
    from hwquant.pipelines import QATOptions, resumable, run_qat

    from .common import machine_info

    only = None if quick else os.environ.get("HWQUANT_QAT_ONLY")
    earlier = _earlier_rows(out_dir) if only else []
    earlier_curves = _earlier_curves(out_dir) if only else {}
    cpu = str(machine_info()["processor"])
    order = {name: i for i, (name, _) in enumerate(RUNS)}

    ck = _checkpoint(quick)
    runs_dir = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / ("bench_qat_quick" if quick else "bench_qat")
    epochs = 1 if quick else env_int("HWQUANT_QAT_EPOCHS", 2)
    plan = RUNS[:2] if quick else [(n, o) for n, o in RUNS if _selected(only, n)]
    extra = {"batch_size": 64, "channels_last": False} if quick else {}
    rows, curves = [], {}
    for name, opts in plan:
        out = runs_dir / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-").replace(",", "")
        cfg = QATOptions(checkpoint=str(ck), epochs=epochs, lr=QAT_LR, out=str(out), resume=resumable(out),
                         progress=False, **extra, **opts)
        row = {"run": name, "w_bits": cfg.w_bits if cfg.method != "fp32" else 32,
               "a_bits": cfg.a_bits if cfg.method != "fp32" else 32, "cpu": cpu}
        try:
            res = run_qat(cfg)
        except DataError as e:  # a run that diverges is a result, not a crash of the benchmark
            rows.append({**row, "note": f"diverged: {e}"})
            print(f"  {name}: {e}", flush=True)
            continue
        reused = res["train_seconds"] < 1.0  # resume found a finished run: nothing was trained now
        # epoch times from the history: right also for a resumed or reused run (train_seconds is this call's)
        train_s = sum(e.get("seconds", 0.0) for e in res["history"])
        rows.append({**row, "start_top1": res["start"]["top1"], "top1": res["final"]["top1"],
                     "top5": res["final"]["top5"], "checkpoint_top1": res["fp32"]["top1"],
                     "train_s": train_s, "note": "reused finished checkpoint" if reused else ""})
        curves[name] = res["step_loss"]
        if cfg.method != "fp32":
            rows[-1]["windows"] = _window_shifts(out)
        if name in EXPORTED and not quick:
            rows[-1].update(_export_check(out))
        print(f"  {name}: start {res['start']['top1']:.2f}% -> {res['final']['top1']:.2f}%", flush=True)
        if write is not None:
            kept = _kept(earlier, rows, cpu)
            write(_finish(rows + kept, ck, epochs, cfg, _with_kept(curves, earlier_curves, cpu, kept), order))
    kept = _kept(earlier, rows, cpu)
    return _finish(rows + kept, ck, epochs, cfg, _with_kept(curves, earlier_curves, cpu, kept), order)


def _earlier_curves(out_dir) -> dict[str, Any]:
    """The earlier ``qat.json``'s loss curves with the CPU they were made on: ``{"cpu", "curves"}``."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    if not path.exists():
        return {}
    f = json.loads(path.read_text())
    acc = (f.get("results") or {}).get("accuracy") or {}
    return {"cpu": str((f.get("machine") or {}).get("processor", "")), "curves": acc.get("curves") or {}}


def _with_kept(curves: dict[str, list], earlier: dict[str, Any], cpu: str, kept: list[dict[str, Any]]):
    """This run's curves plus the earlier file's for the rows kept from it (made on this CPU: the file's curves
    are of its own machine's rows), so a partial run does not drop the other runs' curves from the plot."""
    if earlier.get("cpu") != cpu:
        return curves
    old = earlier.get("curves") or {}
    return {**curves, **{r["run"]: old[r["run"]] for r in kept
                         if r.get("cpu") == cpu and r["run"] in old and r["run"] not in curves}}


def _export_check(run_dir: Path) -> dict[str, Any]:
    """``hwquant export`` of a finished run: the integer model against fake quant and the ONNX graph in
    onnxruntime (default options) against the integer model, every layer-input code of the first test images."""
    from hwquant.pipelines import ExportOptions, run_export

    ck = str(run_dir / "model.pt")
    i = run_export(ExportOptions(checkpoint=ck, format="int", images=EXPORT_IMAGES, out=str(run_dir / "export"),
                                 progress=False))["compare"]
    o = run_export(ExportOptions(checkpoint=ck, format="onnx", images=EXPORT_IMAGES, out=str(run_dir / "export"),
                                 progress=False))["onnx"]
    return {"export": f"{i['codes_diff']} / {o['codes_diff']} of {i['codes']} ({i['images']} images, ORT "
                      f"{o['optimize']})", "export_codes_diff": i["codes_diff"], "onnx_codes_diff": o["codes_diff"]}


def _finish(rows, ck, epochs, cfg, curves, order=None) -> dict[str, Any]:
    """Rows in :data:`RUNS` order (this CPU's first), with drops against the FP32 control of the same CPU."""
    cpu = rows[0].get("cpu") if rows else None
    if order:
        rows = sorted(rows, key=lambda r: (r.get("cpu") != cpu, r.get("cpu", ""), order.get(r["run"], len(order))))
    controls = {r.get("cpu"): r.get("top1") for r in rows if r["run"] == "fp32 control"}
    for r in rows:
        control = controls.get(r.get("cpu"))
        if "top1" in r and control is not None:
            r["drop_vs_control"] = control - r["top1"]
            r["drop_vs_checkpoint"] = r["checkpoint_top1"] - r["top1"]
    return {"checkpoint": str(ck), "epochs": epochs, "lr": QAT_LR, "grad_clip": cfg.grad_clip, "rows": rows,
            "curves": curves}


def _window_shifts(run_dir: Path) -> str:
    """``layer:shift`` of every bit-window activation quantizer of a finished run (``""`` when none)."""
    import torch

    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    sd = state.get("model", state) if isinstance(state, dict) else {}
    shifts = [int(v) for k, v in sd.items() if k.endswith("input_quant.window_shift")] if isinstance(sd, dict) else []
    return " ".join(str(s) for s in shifts)


def _plot(curves: dict[str, list], path: Path) -> None:
    from hwquant.report.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        if pts:
            s, loss = zip(*pts, strict=True)
            ax.plot(s, loss, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of 10 steps)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("QAT fine-tuning from the FP32 checkpoint")
    save_figure(fig, path, dpi=110)


def table(results: dict[str, Any]) -> str:
    sp, acc = results["speed"], results["accuracy"]
    return "\n".join([
        f"## Training step, ResNet-20, batch {sp['batch']}, {sp['rounds']} interleaved rounds "
        f"(fused kernel: {sp['native']['available']}; brevitas installed: {sp['brevitas']}; "
        f"load before: {sp['loadavg_before']})", "",
        markdown_table(sp["rows"], [("model", "model"), ("median_ms", "median ms/step"), ("min_ms", "min ms/step"),
                                    ("images_per_s", "images/s"), ("x_fp32", "x fp32"),
                                    ("first_steps_s", "first 3 steps s")]), "",
        *_fixed_line(sp.get("fixed"), sp["batch"]),
        f"## Accuracy: fine-tuned {acc['epochs']} epoch(s) at lr {acc['lr']} (cosine, gradient norm clipped at "
        f"{acc['grad_clip']}) from {acc['checkpoint']}", "",
        markdown_table(acc["rows"], [("run", "run"), ("cpu", "CPU"), ("w_bits", "W"), ("a_bits", "A"),
                                     ("start_top1", "top-1 before QAT"), ("top1", "top-1"), ("top5", "top-5"),
                                     ("drop_vs_control", "drop vs FP32 control (pt)"),
                                     ("drop_vs_checkpoint", "drop vs checkpoint (pt)"), ("train_s", "train s"),
                                     ("windows", "window shifts (4-bit layer inputs)"),
                                     ("export", "codes differ: int vs FQ / ORT vs int"), ("note", "note")]),
        "",
    ])


def _fixed_line(f: dict[str, Any] | None, batch: int) -> list[str]:
    if not f:
        return []
    return [f"Per-call cost: at batch {f['batch']} ({f['rounds']} interleaved rounds) the FP32 step takes "
            f"{f['fp32_ms']:.2f} ms and the CQAT step {f['cqat_ms']:.2f} ms: {f['extra_ms']:.2f} ms a step whatever "
            f"the batch, {f['of_fp32_step']:.2f} of the batch-{batch} FP32 step.", ""]


def check_settings() -> None:
    """Parse this benchmark's environment settings (``python -m benchmarks.run`` calls it before any work)."""
    env_int("HWQUANT_QAT_EPOCHS", 2)


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    """Measure, write ``qat.{json,md}`` (+ ``qat_loss.png``) and return ``{"results", "table", "json", "md"}``."""
    results: dict[str, Any] = {"speed": speed(quick)}

    def write(partial):  # after every accuracy run: a partial table on disk
        write_results(NAME, {**results, "accuracy": partial}, table({**results, "accuracy": partial}), out_dir=out_dir)

    results["accuracy"] = accuracy(quick, write, out_dir)
    md = table(results)
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    _plot(results["accuracy"]["curves"], Path(json_path).with_name("qat_loss.png"))
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}

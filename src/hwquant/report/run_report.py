"""``hwquant report RUN_DIR``: one page that says where a quantized model loses accuracy.

For a run directory written by ``hwquant ptq`` or ``hwquant qat`` (its ``model.pt`` and ``ptq.json`` /
``qat.json``; a ``train`` run gets the float parts only), :func:`build_report` computes on ``images`` held-out
calibration images of the run's own data split:

* **accuracy and cost**: top-1 / top-5 of the float and quantized model (from the run's JSON: the whole test
  set), bits stored, compression and energy per image (:func:`hwquant.hw.cost_report`);
* **per layer**: weight and input bits, the weight SQNR ``10 log10(|W|^2 / |W - Q(W)|^2)``, the output SQNR
  (the layer's output in the quantized model against the *reference*: the same network with every quantizer
  off, so the noise accumulated from the input on), and **sensitivity** both ways: only this layer quantized
  (the rest float) and every layer but this one; each as the logits' SQNR against the reference and top-1
  on the images.  Sorted by the first, the layer to keep at higher precision comes first;
* **activation histograms** per layer (the reference model's layer input, log counts) with the quantizer's
  clip range ``[q_min s, q_max s]`` drawn on them;
* bits per layer; for QAT the training loss; for MPQ the share of promoted weights and the flip histogram per
  layer; for ARC runs the clip value per layer over training (``arc_clips.json``);
* the integer model's worst-case accumulator width per layer, or the reason there is no integer model.

The reference of a QAT run is its own trained latent weights with the quantizers off (BN folded): the
question a report answers is what quantization does to *this* network.  Written atomically: ``report.html``
(self-contained: the plots are embedded PNGs, readable offline), ``report.md`` with the PNGs next to it, and
``report.json`` with every number.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..fileio import atomic_write, atomic_write_text
from ..nn.quantizer import FakeQuantizer
from ..nn.swap import quant_layers
from ..numerics.codes import qrange
from .markdown import markdown_table

__all__ = ["build_report", "layer_sensitivity", "write_report"]


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    noise = float((ref.double() - x.double()).pow(2).sum())
    signal = float(ref.double().pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


@contextlib.contextmanager
def _quantized(model: nn.Module, only: set[str] | None = None, skip: set[str] = frozenset()) -> Iterator[None]:
    """Every quantizer of the layers in ``only`` (all layers when ``None``) minus ``skip`` on, the rest off;
    the quantizers' own switches are restored afterwards."""
    saved = {q: q.enabled for q in model.modules() if isinstance(q, FakeQuantizer)}
    try:
        for q in saved:
            q.enabled = False
        for name, layer in quant_layers(model):
            if (only is None or name in only) and name not in skip:
                for q in layer.modules():
                    if isinstance(q, FakeQuantizer):
                        q.enabled = saved[q]
        yield
    finally:
        for q, on in saved.items():
            q.enabled = on


def _run(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def _top1(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    return None if labels is None else 100.0 * float((logits.argmax(1) == labels).float().mean())


def layer_sensitivity(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                      order: str = "only") -> list[dict[str, Any]]:
    """Per quantized layer of ``model`` (in eval mode): the logits' SQNR (dB) against the model with every
    quantizer off and top-1 on ``batches`` (``(x, y)``; ``y`` may be ``None``), with only this layer quantized
    (``only_*``) and with every layer but this one (``all_but_*``).  ``order="only"``: sorted by
    ``only_sqnr_db``, lowest first (post-training quantization: the float model is the trained one);
    ``"all_but"``: by ``all_but_top1``, highest first, then ``all_but_sqnr_db`` (a QAT network was trained
    quantized, so its weights with the quantizers off are no reference: what counts is which layer, left
    wider, recovers most)."""
    labels = None if any(y is None for _, y in batches) else torch.cat([y for _, y in batches])
    with _quantized(model, only=set()):
        ref = _run(model, batches)
    rows = []
    for name, _ in quant_layers(model):
        with _quantized(model, only={name}):
            one = _run(model, batches)
        with _quantized(model, skip={name}):
            rest = _run(model, batches)
        rows.append({"layer": name, "only_sqnr_db": _sqnr(ref, one), "only_top1": _top1(one, labels),
                     "all_but_sqnr_db": _sqnr(ref, rest), "all_but_top1": _top1(rest, labels)})
    if order == "all_but":
        return sorted(rows, key=lambda r: (-(r["all_but_top1"] or 0.0), -r["all_but_sqnr_db"]))
    return sorted(rows, key=lambda r: r["only_sqnr_db"])


def _layer_rows(model: nn.Module, batches) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Bits, weight SQNR and output SQNR per layer, and each layer's input in the reference model."""
    layers = list(quant_layers(model))
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    grab_in = [True]  # layer inputs: only in the reference pass
    hooks = []
    for name, layer in layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, n=name: inputs[n].append(a[0].detach().float()) if grab_in[0] else None))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, n=name: outputs[n].append(o.detach().float())))
    try:
        with _quantized(model, only=set()):
            _run(model, batches)
        ref_out = {n: torch.cat(v) for n, v in outputs.items() if v}
        for v in outputs.values():
            v.clear()
        grab_in[0] = False
        with _quantized(model):
            _run(model, batches)
        q_out = {n: torch.cat(v) for n, v in outputs.items() if v}
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, layer in layers:
        wq, iq = layer.weight_quant, layer.input_quant
        w = layer.weight.detach()
        w_bits = getattr(wq, "code_bits", None) if wq is not None and wq.enabled else None
        if w_bits is None and wq is not None and wq.enabled:
            w_bits = wq.spec.bits
        with torch.no_grad():
            w_db = _sqnr(w, wq(w)) if wq is not None and wq.enabled and wq.calibrated else None
        rows.append({"layer": name, "kind": type(layer).__name__, "w_bits": w_bits,
                     "a_bits": iq.spec.bits if iq is not None and iq.enabled else None,
                     "weight_sqnr_db": w_db,
                     "out_sqnr_db": _sqnr(ref_out[name], q_out[name]) if name in ref_out and name in q_out else None})
    return rows, {n: torch.cat(v) for n, v in inputs.items() if v}


def _clip(layer) -> tuple[float, float] | None:
    iq = layer.input_quant
    if iq is None or not (iq.enabled and iq.calibrated) or iq.scale.numel() != 1:
        return None
    qmin, qmax = qrange(iq.spec.bits, bool(iq.signed), iq.spec.narrow)
    s = float(iq.scale)
    return qmin * s, qmax * s


# ------------------------------------------------------------------------------------------------------ plots
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _plots(model, layer_rows, sens, inputs, run: dict[str, Any], run_dir: Path) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    names = [r["layer"] for r in layer_rows]
    if sens:
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(sens) + 1.5))
        ys = range(len(sens))
        ax.barh(ys, [min(r["only_sqnr_db"], 99) for r in sens], color="#c44e52", label="only this layer quantized")
        ax.barh(ys, [min(r["all_but_sqnr_db"], 99) for r in sens], color="#4c72b0", alpha=0.5,
                label="every layer but this one")
        ax.set_yticks(list(ys), [r["layer"] for r in sens], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("logit SQNR vs the model with quantizers off (dB)")
        ax.set_title("Per-layer sensitivity (lowest first)")
        ax.legend(fontsize=7)
        out["sensitivity"] = _png(fig)
    shown = [n for n in names if n in inputs][:24]
    if shown:
        cols = 4
        rows = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(12, 2.2 * rows), squeeze=False)
        mods = dict(quant_layers(model))
        for ax, name in zip(axes.flat, shown, strict=False):
            x = inputs[name].reshape(-1)
            x = x[:: max(1, x.numel() // 200_000)]
            ax.hist(x.numpy(), bins=100, color="#4c72b0", log=True)
            c = _clip(mods[name])
            if c is not None:
                for v in c:
                    ax.axvline(v, color="#c44e52", lw=1)
            ax.set_title(name, fontsize=7)
            ax.tick_params(which="both", labelsize=6)
            ax.set_xlabel("input value", fontsize=6)
            ax.set_ylabel("count", fontsize=6)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        fig.suptitle("Layer inputs (quantizers off) and the input quantizer's clip range (red)", fontsize=9)
        fig.tight_layout()
        out["histograms"] = _png(fig)
    if layer_rows:
        fig, ax = plt.subplots(figsize=(8, 2.5))
        xs = range(len(layer_rows))
        ax.step(xs, [r["w_bits"] or 32 for r in layer_rows], where="mid", label="weights")
        ax.step(xs, [r["a_bits"] or 32 for r in layer_rows], where="mid", label="inputs", ls="--")
        ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
        ax.set_ylabel("bits (32: float)")
        ax.set_title("Bits per layer")
        ax.legend(fontsize=7)
        out["bits"] = _png(fig)
    steps = (run.get("qat") or {}).get("step_loss") or []
    if steps:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.plot([s[0] for s in steps], [s[1] for s in steps], lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title("QAT training loss")
        out["loss"] = _png(fig)
    mpq = (run.get("qat") or {}).get("mpq") or []
    if mpq and all("flip_hist" in r for r in mpq):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 2.8))
        a1.bar(range(len(mpq)), [100 * r["extra_fraction"] for r in mpq])
        a1.set_xticks(range(len(mpq)), [r["layer"] for r in mpq], rotation=90, fontsize=6)
        a1.set_ylabel("weights with the extra bit (%)")
        total = [sum(r["flip_hist"][j] for r in mpq) for j in range(len(mpq[0]["flip_hist"]))]
        a2.bar([str(j) if j < len(total) - 1 else f">={j}" for j in range(len(total))], total, log=True)
        a2.set_xlabel("flips per weight (counted window)")
        a2.set_ylabel("weights")
        fig.suptitle("MPQ: promoted weights per layer and the flip histogram", fontsize=9)
        out["mpq"] = _png(fig)
    clips = run_dir / "arc_clips.json"
    if clips.exists():
        data = json.loads(clips.read_text())
        fig, ax = plt.subplots(figsize=(7, 3))
        for layer, kinds in sorted(data.items()):
            pts = kinds.get("error", [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / p[2] if p[2] else 1.0 for p in pts], lw=0.8, label=layer)
        ax.set_xlabel("training step")
        ax.set_ylabel("clip / max|g| (error gradients)")
        ax.set_yscale("log")
        ax.set_title("ARC: clip per layer over training")
        ax.legend(fontsize=5, ncol=2)
        out["arc"] = _png(fig)
    return out


# ----------------------------------------------------------------------------------------------- the report
def _run_files(run_dir: Path) -> dict[str, Any]:
    run: dict[str, Any] = {}
    for kind in ("ptq", "qat"):
        f = run_dir / f"{kind}.json"
        if f.exists():
            try:
                run[kind] = json.loads(f.read_text())
            except ValueError:
                raise ConfigError(f"{f} is not valid JSON (an interrupted run?)") from None
    return run


def build_report(run_dir: str | Path, images: int = 256, batch_size: int = 128, data_dir: str | None = None
                 ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report's numbers (JSON-ready) and its plots (PNG bytes by name) for ``run_dir``."""
    from ..export import integer_model
    from ..hw import cost_report
    from ..pipelines import checkpoint_loaders, load_model

    run_dir = Path(run_dir)
    ck_path = run_dir / "model.pt"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    if not ck_path.exists():
        raise ConfigError(f"{run_dir} holds no model.pt: give a directory written by hwquant train, ptq or qat")
    if images < 1:
        raise ConfigError(f"images must be >= 1, got {images}")
    run = _run_files(run_dir)
    model, ck = load_model(ck_path)
    loaders = checkpoint_loaders(ck, data_dir, batch_size)
    source = loaders.calib if loaders.calib is not None and len(loaders.calib) else loaders.test
    batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    seen = 0
    for x, y in source:
        take = min(x.shape[0], images - seen)
        batches.append((x[:take], y[:take]))
        seen += take
        if seen >= images:
            break
    model.eval()
    kind = "ptq" if "ptq" in ck else "qat" if "qat" in ck else "float"
    layer_rows, inputs = _layer_rows(model, batches)
    order = "all_but" if kind == "qat" else "only"
    sens = layer_sensitivity(model, batches, order) if layer_rows else []
    example = batches[0][0][:1]
    cost = cost_report(model, example)["total"]
    fp32_cost = None
    try:
        from ..models import create_model_from_args

        fp32_cost = cost_report(create_model_from_args(ck["model_args"]).eval(), example)["total"]
    except (ConfigError, RuntimeError, TypeError, KeyError):  # a model that cannot be rebuilt: no FP32 column
        fp32_cost = None
    integer: dict[str, Any]
    try:
        integer = {"layers": integer_model(model, example).layers()} if layer_rows else {"error": "no quantized layer"}
    except ConfigError as e:
        integer = {"error": str(e)}
    res = run.get(kind) or {}
    acc = []
    if kind == "ptq":
        acc = [{"model": "FP32", **_acc(res.get("fp32"))},
               {"model": f"{res.get('method')} PTQ", **_acc(res.get("quant"))}]
    elif kind == "qat":
        acc = [{"model": "FP32 checkpoint", **_acc(res.get("fp32"))}, {"model": "quantized, before QAT",
                                                                        **_acc(res.get("start"))},
               {"model": f"{res.get('method')} QAT", **_acc(res.get("final"))}]
    elif "metrics" in ck:
        acc = [{"model": "FP32", **_acc(ck["metrics"])}]
    for row in acc:
        row.update(stored_kib=None, compression=None, energy_uj=None)
    if acc:
        last = acc[-1]
        last.update(stored_kib=cost["stored_bits"] / 8192, compression=cost["compression_ratio"],
                    energy_uj=cost["energy_uj"])
        if fp32_cost is not None and len(acc) > 1:
            acc[0].update(stored_kib=fp32_cost["stored_bits"] / 8192, compression=1.0,
                          energy_uj=fp32_cost["energy_uj"])
    report = {"run_dir": str(run_dir), "kind": kind, "sensitivity_order": order, "model": ck["model_args"].get("name"),
              "dataset": ck["data"]["dataset"], "images": seen, "accuracy": acc, "layers": layer_rows,
              "sensitivity": sens, "integer": integer,
              "mpq": (res.get("mpq") if kind == "qat" else None)}
    plots = _plots(model, layer_rows, sens, inputs, {"qat": res if kind == "qat" else None}, run_dir)
    return report, plots


def _acc(m: dict[str, Any] | None) -> dict[str, Any]:
    m = m or {}
    return {"top1": m.get("top1"), "top5": m.get("top5")}


_ACC_COLS = [("model", "model"), ("top1", "top-1 %"), ("top5", "top-5 %"), ("stored_kib", "stored KiB"),
             ("compression", "compression vs FP32"), ("energy_uj", "energy uJ/image")]
_LAYER_COLS = [("layer", "layer"), ("kind", "kind"), ("w_bits", "W bits"), ("a_bits", "A bits"),
               ("weight_sqnr_db", "weight SQNR dB"), ("out_sqnr_db", "output SQNR dB")]
_SENS_COLS = [("layer", "layer"), ("only_sqnr_db", "only this layer: logit SQNR dB"), ("only_top1", "top-1 %"),
              ("all_but_sqnr_db", "all but this layer: logit SQNR dB"), ("all_but_top1", "top-1 %")]
_INT_COLS = [("layer", "layer"), ("acc_bits", "accumulator bits (worst case)"), ("w_bits", "W bits"),
             ("x_bits", "input bits"), ("macs", "MACs")]
_TITLES = {"sensitivity": "Per-layer sensitivity", "histograms": "Activation histograms", "bits": "Bits per layer",
           "loss": "QAT loss", "mpq": "MPQ: promoted weights and flips", "arc": "ARC clips"}


def _sections(report: dict[str, Any]) -> list[tuple[str, str, list, list]]:
    """``(title, text, rows, columns)`` of the report's tables, in page order."""
    sens = report["sensitivity"]
    if not sens:
        worst = "No quantized layer."
    elif report.get("sensitivity_order") == "all_but":
        top1 = sens[0]["all_but_top1"]
        worst = (f"Layer to keep wider first: `{sens[0]['layer']}` (every other layer quantized: top-1 "
                 f"{'-' if top1 is None else f'{top1:.2f} %'}); a QAT network was trained quantized, so layers are "
                 "ranked by what leaving each one unquantized recovers.")
    else:
        worst = (f"Most sensitive layer: `{sens[0]['layer']}` (logit SQNR {sens[0]['only_sqnr_db']:.1f} dB when "
                 "it alone is quantized); keep it at higher precision first.")
    out = [("Accuracy and cost", "Top-1 / top-5 on the whole test set (from the run's JSON); cost per image.",
            report["accuracy"], _ACC_COLS),
           ("Per-layer sensitivity", worst + f" Measured on {report['images']} held-out calibration images; the "
            "reference is the same network with every quantizer off.", sens, _SENS_COLS),
           ("Layers", "Output SQNR: the layer's output with every quantizer on against the reference (noise "
            "accumulated from the input on).", report["layers"], _LAYER_COLS)]
    integer = report["integer"]
    if "layers" in integer:
        out.append(("Integer model", "Worst-case accumulator width per layer (`hwquant.export.integer_model`).",
                    integer["layers"], _INT_COLS))
    else:
        out.append(("Integer model", f"No integer model: {integer.get('error')}", [], []))
    if report.get("mpq"):
        out.append(("MPQ", "Promoted weights and flips per layer.", report["mpq"], [
            ("layer", "layer"), ("extra_fraction", "extra share"), ("flipping_weights", "flipping weights"),
            ("flip_frequency_mean", "flip frequency"), ("slowed_share_mean", "LR-slowed share")]))
    return out


def _html_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    if not rows:
        return ""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.2f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}")


def write_report(report: dict[str, Any], plots: dict[str, bytes], out: str | Path) -> dict[str, Path]:
    """``report.html`` (self-contained), ``report.md`` + ``report_<plot>.png``, ``report.json`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"hwquant report: {report['model']} on {report['dataset']} ({report['kind']}, {report['run_dir']})"
    md = [f"# {title}\n"]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for name, text, rows, cols in _sections(report):
        md.append(f"## {name}\n\n{text}\n\n" + (markdown_table(rows, cols) + "\n" if rows else ""))
        page.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(text)}</p>{_html_table(rows, cols)}")
    paths = {}
    for name, png in plots.items():
        f = out / f"report_{name}.png"
        atomic_write(f, lambda tmp, png=png: Path(tmp).write_bytes(png))
        paths[name] = f
        md.append(f"## {_TITLES.get(name, name)}\n\n![{name}]({f.name})\n")
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        page.append(f"<h2>{html.escape(_TITLES.get(name, name))}</h2><img alt='{name}' src='{src}'>")
    page.append("</body></html>")
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", "".join(page))
    atomic_write_text(out / "report.json", json.dumps(_finite(report), indent=1, allow_nan=False))
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json", **paths}


def _finite(v):
    """Strict JSON: an infinite SQNR (no noise at all) becomes the string ``"inf"``."""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf" if v < 0 else "nan"
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v

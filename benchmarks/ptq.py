"""PTQ accuracy benchmark: GGD PTQ against the calibration baselines, all in one run.

Part 1, synthetic (``synthetic`` rows): samples from generalized gamma densities of several shapes
(two-sided Gaussian-like, Laplace-like, heavy-tailed; one-sided post-ReLU-like with 50% zeros; image-like: a
Laplace density with half the values on one background value -0.81, the spike of a normalised image) at 4, 6
and 8 bits.  For each, the SQNR of the step chosen by each observer (GGD with and without atoms, min-max,
percentile 99.99, MSE, KL, ACIQ-Laplace) against the **exhaustive best uniform step** (a 600-point log grid
search on the same samples).

Part 2, model (``model`` rows): ResNet-20 trained on Fashion-MNIST (the demo's cached checkpoint, trained if
missing), test top-1 and end-to-end logit SQNR at W8A8, W6A6, W4A4, W8A4 for every method, same checkpoint,
same calibration split (1000 training images held out), same test set; every layer at the setting's bits,
and for W4A4 / W8A4 also with the first conv (whose input is the image) and the last FC at 8 bits.
Weights are per tensor for every method (the GGD paper's per-layer fixed point): GGD uses the
error-minimising power-of-two FL, min-max uses ``max|W|``, the other baselines use an MSE-optimal weight clip.
Activations: the method's observer, per tensor, unsigned after ReLU.  GGD steps are powers of two (fixed
point; the image layer's as a power of two times a host-side input gain, see
:func:`hwquant.nn.fold.fold_input_gain`); the baselines' steps are arbitrary reals, which favours the baselines;
``ggd free steps`` is GGD PTQ without BFT with the exact GGD activation steps (not powers of two), which
separates the density model from the fixed-point constraint; ``ggd image rounded`` is plain GGD with the image
layer's step rounded to a power of two like the others (``image_gain=False``, the rule before the gain).
``+bc``: the same with empirical bias correction after calibration (:func:`hwquant.nn.correct_bias`; not part
of any of the published methods) for the two strongest baselines and plain GGD; ``ggd+bft+bc``: GGD+BFT with the
bias correction before the tuning (BFT starts from the corrected model).
GGD+BFT twice: ``ggd+bft top1``
scores BFT by calibration top-1 (the paper's criterion, no hold-out) and ``ggd+bft`` by the default (KL
divergence from the float model's softmax on 512 images, each change checked on 256 held-out ones).  The
GGD+BFT wall time (the whole PTQ including BFT) is reported; ``ggd+bft - best other`` is against the best of
the five published baselines (without ``+bc``).

``HWQUANT_PTQ_ONLY="W4A4:first,W8A4:first"`` reruns only the model rows whose ``setting:layers`` starts with
one of the entries and keeps the earlier file's other rows (and its synthetic table) as they were;
``HWQUANT_PTQ_METHODS="ggd+bft+bc,mse+bc"`` with it measures only those columns of the rerun rows and keeps the
earlier figures of the others.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from hwquant.methods import GGDPTQConfig, ObserverPTQConfig, ptq
from hwquant.numerics import fake_quantize, sqnr_db
from hwquant.numerics.ggd import GGD, ggd_optimal_step
from hwquant.numerics.ggd_atoms import Atom, mixture_mse, mixture_optimal_step
from hwquant.observers import make_observer
from hwquant.spec import QuantSpec
from hwquant.train import evaluate

from .common import float_checkpoint, markdown_table, write_results

NAME = "ptq"

SHAPES = {  # name: (GGD of the continuous part and zeros, point masses that replace a share of the values)
    "gauss-like a=2 b=0": (GGD(alpha=2.0, beta=0.0, lam=0.5, signed=True), []),
    "laplace a=1 b=0": (GGD(alpha=1.0, beta=0.0, lam=1.0, signed=True), []),
    "heavy a=0.5 b=0": (GGD(alpha=0.5, beta=0.0, lam=2.0, signed=True), []),
    "relu-like a=1.5 b=0.5 p0=0.5": (GGD(alpha=1.5, beta=0.5, lam=1.0, zero_mass=0.5, signed=False), []),
    "image-like: laplace + 50% at -0.81": (GGD(alpha=1.0, beta=0.0, lam=1.0, signed=True), [Atom(-0.81, 0.5)]),
}
OBSERVERS = {
    "ggd": {},
    "ggd no atoms": {"atoms": False},
    "ggd pow2": {"power_of_two": True},
    "minmax": {},
    "percentile": {"percentile": 99.99},
    "mse": {},
    "kl": {},
    "aciq": {"dist": "laplace"},
}
SETTINGS = [(8, 8), (6, 6), (4, 4), (8, 4)]
# Every layer at the setting's bits, and the usual deployment variant with the first conv (the image input)
# and the last FC at 8 bits, for the settings where the input layer decides the outcome.
VARIANTS = [("all layers", None, SETTINGS), ("first/last 8-bit", 8, [(4, 4), (8, 4)])]
METHODS = ["minmax", "percentile", "mse", "kl", "aciq", "mse+bc", "aciq+bc", "ggd free steps", "ggd image rounded",
           "ggd", "ggd+bc", "ggd+bft top1", "ggd+bft", "ggd+bft+bc"]
BASELINES = ("minmax", "percentile", "mse", "kl", "aciq")  # the published ones: the bar's reference


def best_uniform_sqnr(x: torch.Tensor, bits: int, signed: bool, points: int = 600) -> tuple[float, float]:
    """Exhaustive search: the best SQNR over a log grid of steps (and the step achieving it)."""
    amax = float(x.abs().max())
    levels = 2 ** (bits - 1) if signed else 2**bits
    lo, hi = amax / levels / 64, amax / levels * 1.05
    best = (-math.inf, lo)
    for i in range(points):
        step = lo * (hi / lo) ** (i / (points - 1))
        s = sqnr_db(x, fake_quantize(x, step, bits, signed))
        if s > best[0]:
            best = (s, step)
    return best


def synthetic(quick: bool) -> list[dict[str, Any]]:
    n = 50_000 if quick else 200_000
    rows = []
    for shape_name, (ggd, atoms) in SHAPES.items():
        x = _sample(ggd, atoms, n)
        for bits in (4, 6, 8):
            best, best_step = best_uniform_sqnr(x, bits, ggd.signed, 150 if quick else 600)
            row: dict[str, Any] = {"shape": shape_name, "bits": bits, "best": best}
            for obs_name, args in OBSERVERS.items():
                observer = "ggd" if obs_name.startswith("ggd") else obs_name
                spec = QuantSpec(bits=bits, signed=ggd.signed, observer=observer, observer_args=args)
                obs = make_observer(spec)
                for chunk in x.split(n // 4):
                    obs.update(chunk)
                p = obs.compute()
                row[obs_name] = sqnr_db(x, fake_quantize(x, p.scale, bits, p.signed))
            row["ggd - best"] = row["ggd"] - best
            # the same steps judged under the true density (expected SQNR): is a gap the step or the sample?
            if atoms:
                true_step = mixture_optimal_step(ggd, atoms, bits, ggd.signed, peak=float(x.abs().max()))
            else:
                true_step = ggd_optimal_step(ggd, bits)
            ms = (1 - sum(a.mass for a in atoms)) * ggd.mean_square() + sum(a.mass * a.value**2 for a in atoms)

            row["true-density step on the sample"] = sqnr_db(x, fake_quantize(x, true_step, bits, ggd.signed))
            for key, step in (("expected: exact step", true_step), ("expected: sample's best step", best_step)):
                row[key] = 10 * math.log10(ms / mixture_mse(ggd, atoms, step, bits, ggd.signed))
            rows.append(row)
    return rows


def _sample(ggd: GGD, atoms: list[Atom], n: int) -> torch.Tensor:
    """``n`` values of the mixture (seeded): the GGD's, each replaced by an atom with that atom's mass."""
    import numpy as np

    rng = np.random.default_rng(1)
    v = ggd.sample(n, seed=rng)
    u = rng.random(n)
    lo = 0.0
    for a in atoms:
        v = np.where((u >= lo) & (u < lo + a.mass), a.value, v)
        lo += a.mass
    return torch.as_tensor(v, dtype=torch.float32)


def _checkpoint(quick: bool) -> Path:
    return float_checkpoint(quick, "bench_ptq_digits")


def _config(method: str, wb: int, ab: int, first_last: int | None = None):
    if method.endswith("+bc"):
        return dataclasses.replace(_config(method[:-3], wb, ab, first_last), bias_correction=True)
    if method == "ggd free steps":
        return GGDPTQConfig(w_bits=wb, a_bits=ab, bft=False, power_of_two=False, first_last_bits=first_last)
    if method == "ggd image rounded":  # the image layer's step rounded to a power of two like the others
        return GGDPTQConfig(w_bits=wb, a_bits=ab, bft=False, image_gain=False, first_last_bits=first_last)
    if method == "ggd+bft top1":
        return GGDPTQConfig(w_bits=wb, a_bits=ab, first_last_bits=first_last, bft_criterion="top1", bft_holdout=0)
    if method.startswith("ggd"):
        return GGDPTQConfig(w_bits=wb, a_bits=ab, bft=method == "ggd+bft", first_last_bits=first_last)
    args = {"percentile": {"percentile": 99.99}, "aciq": {"dist": "laplace"}}.get(method, {})
    return ObserverPTQConfig(observer=method, observer_args=args, w_observer="minmax" if method == "minmax" else "mse",
                             w_bits=wb, a_bits=ab, per_channel=False, first_last_bits=first_last)


def model_rows(quick: bool, write=None, out_dir=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The model table; ``write(rows, meta)`` is called after every row (a partial table on disk)."""
    from hwquant.pipelines import checkpoint_loaders, load_model

    ck_path = _checkpoint(quick)
    model, ck = load_model(ck_path)
    loaders = checkpoint_loaders(ck, None, 512)
    fp32 = evaluate(model, loaders.test)
    rows = []
    plan = [(v, fl, st) for v, fl, sts in VARIANTS for st in sts]
    if quick:
        plan = [("all layers", None, (4, 4))]
    only = _only()
    earlier = {(r["setting"], r["variant"]): r for r in (_earlier(out_dir).get("model") or [])} if only else {}
    for variant, first_last, (wb, ab) in plan:
        if only and not any(f"W{wb}A{ab}:{variant}".startswith(o) for o in only):
            if (f"W{wb}A{ab}", variant) in earlier:
                rows.append(earlier[(f"W{wb}A{ab}", variant)])
            continue
        row: dict[str, Any] = {"setting": f"W{wb}A{ab}", "variant": variant, "fp32": fp32["top1"]}
        methods = _methods()
        if methods != METHODS:  # a subset of columns: the others as the earlier file has them
            row = {**earlier.get((f"W{wb}A{ab}", variant), {}), **row}
        for method in methods:
            t0 = time.perf_counter()
            qmodel, report = ptq(model, _config(method, wb, ab, first_last), loaders.calib)
            secs = time.perf_counter() - t0
            ev = evaluate(qmodel, loaders.test)
            row[method] = ev["top1"]
            row[f"{method} sqnr"] = report["sqnr_db"]
            if method == "ggd+bft":
                row["ggd+bft seconds"] = secs
                row["bft calib top1"] = f"{report['bft']['before']['top1']:.1f}->{report['bft']['after']['top1']:.1f}"
                row["bft evaluations"] = report["bft"]["evaluations"]
                row["bft rejected by holdout"] = report["bft"]["rejected_by_holdout"]
            elif method == "ggd+bft top1":
                row["bft top1 calib top1"] = (f"{report['bft']['before']['top1']:.1f}->"
                                              f"{report['bft']['after']['top1']:.1f}")
        if all(m in row for m in BASELINES + ("ggd+bft",)):
            row["ggd+bft - best other"] = row["ggd+bft"] - max(row[m] for m in BASELINES)
        rows.append(row)
        print(f"  {row['setting']} ({variant}): " + ", ".join(f"{m} {row[m]:.2f}" for m in methods), flush=True)
        if write is not None and len(rows) < len(plan):
            write(rows, {"checkpoint": str(ck_path), "dataset": ck["data"]["dataset"], "fp32": fp32,
                         "partial": f"{len(rows)} of {len(plan)} settings"})
    meta = {"checkpoint": str(ck_path), "dataset": ck["data"]["dataset"], "fp32": fp32}
    return rows, meta


def _only() -> list[str]:
    return [o.strip() for o in os.environ.get("HWQUANT_PTQ_ONLY", "").split(",") if o.strip()]


def _methods() -> list[str]:
    """``HWQUANT_PTQ_METHODS`` (a subset of :data:`METHODS`, in their order; only with ``HWQUANT_PTQ_ONLY``)."""
    chosen = [m.strip() for m in os.environ.get("HWQUANT_PTQ_METHODS", "").split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise ValueError(f"HWQUANT_PTQ_METHODS: unknown method(s) {unknown}; known: {METHODS}")
    if chosen and not _only():
        raise ValueError("HWQUANT_PTQ_METHODS needs HWQUANT_PTQ_ONLY (the rows whose columns it reruns)")
    return [m for m in METHODS if m in chosen] if chosen else METHODS


def _earlier(out_dir) -> dict[str, Any]:
    """The earlier results file's ``results`` (``{}`` when there is none)."""
    import json

    from .common import results_dir

    path = results_dir(out_dir) / f"{NAME}.json"
    return json.loads(path.read_text()).get("results", {}) if path.exists() else {}


def table(results: dict[str, Any]) -> str:
    syn_cols = [("shape", "shape"), ("bits", "bits"), ("best", "best step (exhaustive)")] + [
        (k, k) for k in OBSERVERS] + [("ggd - best", "ggd - best")]
    true_cols = [("shape", "shape"), ("bits", "bits"), ("best", "sample: best step (exhaustive)"),
                 ("true-density step on the sample", "sample: the true density's exact step"),
                 ("expected: exact step", "expected: exact step"),
                 ("expected: sample's best step", "expected: the sample's best step")]
    model_cols = [("setting", "setting"), ("variant", "layers"), ("fp32", "FP32")] + [(m, m) for m in METHODS] + [
        ("ggd+bft - best other", "ggd+bft - best other"), ("bft top1 calib top1", "BFT top-1: calib top-1"),
        ("bft calib top1", "BFT KL: calib top-1"), ("bft rejected by holdout", "BFT KL: rejected by hold-out"),
        ("ggd+bft seconds", "GGD+BFT s")]
    sqnr_cols = [("setting", "setting"), ("variant", "layers")] + [(f"{m} sqnr", m) for m in METHODS]
    meta = results["model_meta"]
    return "\n".join([
        "## Synthetic: SQNR (dB) of each observer's step vs the exhaustive best uniform step", "",
        markdown_table(results["synthetic"], syn_cols), "",
        f"## {meta['dataset']} ({meta['checkpoint']}): test top-1 (%)"
        + (f" - partial: {meta['partial']}" if meta.get("partial") else ""), "",
        markdown_table(results["model"], model_cols), "",
        "## End-to-end logit SQNR (dB, calibration split)", "",
        markdown_table(results["model"], sqnr_cols), "",
        "## Synthetic: the exact expected-MSE step of the true density, on the sample and in expectation (dB)", "",
        markdown_table(results["synthetic"], true_cols), "",
    ])


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    """Measure, write ``ptq.{json,md}`` and return ``{"results", "table", "json", "md"}``."""
    torch.manual_seed(0)
    kept = _earlier(out_dir).get("synthetic") if _only() and not quick else None
    results: dict[str, Any] = {"synthetic": kept or synthetic(quick)}
    def write(rows, meta):  # after every setting: a partial table on disk
        partial = {**results, "model": rows, "model_meta": meta}
        write_results(NAME, partial, table(partial), out_dir=out_dir)

    rows, meta = model_rows(quick, write, out_dir)
    results["model"] = rows
    results["model_meta"] = meta
    md = table(results)
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}

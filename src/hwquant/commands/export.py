"""``hwquant export``: integer model, golden vectors, ONNX / QONNX or RTL rounding units, each checked."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..device import DEVICES, resolve_device
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text
from ..train import save_checkpoint
from .common import (
    DEVICE_HELP,
    check_choice,
    check_device,
    check_output_dir,
    checkpoint_loaders,
    doc,
    limited,
    load_model,
    save_config,
    set_threads,
    write_json,
)

EXPORT_FORMATS = ("int", "golden", "onnx", "qonnx", "rtl")


QONNX_CHECK_IMAGES = 64  # qonnx's executor runs node by node: check a few images unless --images says more


@dataclass(frozen=True)
class ExportOptions:
    """``hwquant export``: integer model, golden vectors, ONNX or RTL rounding units of a quantized checkpoint."""

    checkpoint: str = field(default="runs/ptq/model.pt", metadata=doc(
        "quantized checkpoint from hwquant ptq/qat (not needed for --format rtl)"))
    format: str = field(default="int", metadata=doc(
        "int: integer model + bit-exactness check against the fake-quant model; golden: $readmemh vectors + "
        "manifest, replayed with numpy; onnx: QDQ graph checked in onnxruntime; qonnx: Quant nodes at any width, "
        "checked with the qonnx executor (64 images unless --images); rtl: Amaranth rounding units",
        EXPORT_FORMATS))
    out: str = field(default="runs/export", metadata=doc("output directory"))
    images: int | None = field(default=None, metadata=doc("test images for the checks (none: the whole test set)"))
    golden_images: int = field(default=1, metadata=doc("golden: images in the vectors"))
    opset: int = field(default=21, metadata=doc("onnx: opset (21 allows INT4/UINT4 codes)"))
    rtl_in_width: int = field(default=16, metadata=doc("rtl: signed input width"))
    rtl_frac_bits: int = field(default=8, metadata=doc("rtl: input fraction bits"))
    rtl_out_width: int = field(default=8, metadata=doc("rtl: signed output code width"))
    rtl_modes: str = field(default="nearest,zero,stochastic", metadata=doc("rtl: comma-separated rounding modes"))
    synth: bool = field(default=False, metadata=doc("rtl: synthesize with yosys and report cell counts"))
    batch_size: int = field(default=256, metadata=doc("batch size of the checks"))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (default: as in the checkpoint)"))
    device: str = field(default="auto", metadata=doc(
        DEVICE_HELP + "; checked, but the integer model (int64 arithmetic) and its checks run on the CPU whatever "
        "it says", DEVICES))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads"))
    progress: bool = field(default=True, metadata=doc("show progress bars"))

    def __post_init__(self) -> None:
        check_choice("format", self.format, EXPORT_FORMATS)
        check_device(self.device)
        if self.images is not None and self.images < 1:
            raise ConfigError(f"images must be >= 1 or null, got {self.images}")
        if self.golden_images < 1:
            raise ConfigError(f"golden_images must be >= 1, got {self.golden_images}")
        if not 13 <= self.opset <= 23:
            raise ConfigError(f"opset must be in 13..23, got {self.opset}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.rtl_params()

    def rtl_params(self) -> list:
        from ..export.rtl import MODES, RoundingUnitParams

        modes = [m.strip() for m in str(self.rtl_modes).split(",") if m.strip()]
        if not modes:
            raise ConfigError("rtl_modes must list at least one mode")
        for m in modes:
            check_choice("rtl_modes entry", m, MODES)
        return [RoundingUnitParams(self.rtl_in_width, self.rtl_frac_bits, self.rtl_out_width, m) for m in modes]


def run_export(cfg: ExportOptions) -> dict[str, Any]:
    """Export a quantized checkpoint (or RTL rounding units) and check the export; writes OUT/export.json."""
    set_threads(cfg.threads)
    resolve_device(cfg.device)  # checked only: the integer model runs on the CPU
    out = check_output_dir(cfg.out)
    if cfg.format == "rtl":
        result = _export_rtl(cfg, out)
    else:
        result = _export_model(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"export-{cfg.format}.json", result)
    save_config(out, cfg)
    return result


def _export_model(cfg: ExportOptions, out: Path) -> dict[str, Any]:
    from ..export import compare, integer_model

    model, ck = load_model(cfg.checkpoint)
    if "ptq" not in ck and not ("qat" in ck and ck["qat"]["method"] != "fp32"):
        raise CheckpointError(f"{cfg.checkpoint} is not a quantized checkpoint (run hwquant ptq or qat first)")
    loaders = checkpoint_loaders(ck, cfg.data_dir, cfg.batch_size)
    example = next(iter(loaders.test))[0][:1]
    imodel = integer_model(model, example)
    layers = imodel.layers()
    result: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "format": cfg.format,
                              "acc_bits_max": max(r["acc_bits"] for r in layers), "layers": layers}
    out.mkdir(parents=True, exist_ok=True)
    if cfg.format == "int":
        t0 = time.perf_counter()
        cmp = compare(model, imodel, limited(loaders.test, cfg.images), progress=cfg.progress)
        result["compare"] = cmp
        result["seconds"] = time.perf_counter() - t0
        params = {op.name: {k: v for k, v in op.params.items() if isinstance(v, torch.Tensor)} for op in imodel.ops}
        save_checkpoint(out / "integer_model.pt", {"format": "hwquant-integer-1", "ops": imodel.summary(),
                                                   "params": params, "input_scale": float(imodel.input_scale),
                                                   "output_scale": imodel.output_scale})
        write_json(out / "integer_model.json", {"ops": imodel.summary(), "layers": layers})
        print(f"integer model: {len(imodel.ops)} ops, accumulators up to {result['acc_bits_max']} bits "
              f"-> {out / 'integer_model.pt'}")
        print(f"vs fake-quant on {cmp['images']} images: {cmp['codes_diff']} of {cmp['codes']} layer-input codes "
              f"differ (max {cmp['max_code_lsb']} LSB), {cmp['out_diff']} of {cmp['out_elements']} outputs differ "
              f"(max |diff| {cmp['max_abs_diff']:.3g}); top-1 fake-quant {cmp['top1_fake_quant']:.2f}% / integer "
              f"{cmp['top1_integer']:.2f}%")
    elif cfg.format == "golden":
        from ..export.golden import verify, write_golden

        xs = next(iter(limited(loaders.test, cfg.golden_images)))[0]
        manifest = write_golden(imodel, xs, out / "golden")
        check = verify(out / "golden")
        result["golden"] = {"manifest": str(manifest), **check}
        print(f"golden vectors: {check['ops']} ops, {check['values']} values, {xs.shape[0]} image(s) -> {manifest}; "
              f"numpy replay {'matches every file' if check['ok'] else 'MISMATCHES ' + ', '.join(check['mismatches'])}")
    elif cfg.format == "qonnx":
        from ..export.qonnx import check_qonnx, to_qonnx

        path = to_qonnx(imodel, out / "model.qonnx.onnx")
        n = cfg.images or QONNX_CHECK_IMAGES
        check = check_qonnx(path, imodel, limited(loaders.test, n))
        result["qonnx"] = {"path": str(path), **check}
        print(f"QONNX -> {path}; {check['executor']} executor on {n} images: {check['codes_diff']} of "
              f"{check['codes']} codes differ from the integer model (max {check['max_code_lsb']} LSB)")
    else:
        import tempfile

        from ..export.onnx import check_onnx, fused_ops, to_onnx

        path = to_onnx(imodel, out / "model.onnx", opset=cfg.opset)
        with tempfile.TemporaryDirectory() as d:
            probe = to_onnx(imodel, Path(d) / "probe.onnx", opset=cfg.opset, codes_outputs=True)
            check = check_onnx(probe, imodel, limited(loaders.test, cfg.images))
        check["runtime_ops"] = fused_ops(path)
        result["onnx"] = {"path": str(path), **check}
        print(f"ONNX opset {cfg.opset} -> {path}; onnxruntime ({check['optimize']} optimizations) on "
              f"{check['images']} images: {check['codes_diff']} of {check['codes']} codes differ from the integer "
              f"model (max {check['max_code_lsb']} LSB); top-1 onnx {check['top1_onnx']:.2f}% / integer "
              f"{check['top1_integer']:.2f}%")
    return result


def _export_rtl(cfg: ExportOptions, out: Path) -> dict[str, Any]:
    import numpy as np

    from ..export import rtl

    rows = []
    (out / "rtl").mkdir(parents=True, exist_ok=True)
    for p in cfg.rtl_params():
        unit = rtl.rounding_unit(p)
        vpath = out / "rtl" / f"{p.name()}.v"
        atomic_write_text(vpath, rtl.verilog(unit))
        x = rtl.check_vectors(p)
        sim = rtl.simulate(p, x)
        ref = rtl.reference_codes(p, x)
        row = {"unit": p.name(), "mode": p.mode, "verilog": str(vpath), "vectors": int(len(x)),
               "sim_ok": bool(np.array_equal(sim, ref))}
        if cfg.synth:
            row["synth"] = rtl.synthesize(rtl.rounding_unit(p))
        rows.append(row)
        cells = f", {row['synth']['cells']} cells" if cfg.synth and "cells" in row.get("synth", {}) else ""
        print(f"{p.name()}: simulation {'matches' if row['sim_ok'] else 'DIFFERS FROM'} hwquant.numerics.quantize "
              f"on {row['vectors']} inputs{cells} -> {vpath}")
    return {"format": "rtl", "units": rows}

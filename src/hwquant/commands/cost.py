"""``hwquant cost``: the hardware cost of a checkpoint on a bit-width-reconfigurable PE array."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..device import DEVICES, resolve_device
from ..errors import ConfigError
from ..fileio import atomic_write_text
from ..models import create_model_from_args
from .common import (
    DEVICE_HELP,
    check_device,
    check_output_dir,
    checkpoint_loaders,
    doc,
    load_model,
    save_config,
    write_json,
)


@dataclass(frozen=True)
class CostOptions:
    """``hwquant cost``: bits stored, compression ratio, BOPs, cycles and energy of a float or quantized
    checkpoint on a bit-width-reconfigurable PE array (45 nm energy table), next to the same network in FP32."""

    checkpoint: str = field(default="runs/ptq/model.pt", metadata=doc("checkpoint (float or quantized)"))
    out: str | None = field(default=None, metadata=doc("write cost.json and cost.md here (default: print only)"))
    pe_rows: int = field(default=16, metadata=doc("PE array rows (output channels in parallel)"))
    pe_cols: int = field(default=16, metadata=doc("PE array columns (output pixels in parallel)"))
    brick_bits: int = field(default=2, metadata=doc("width of the fused multiplier bricks"))
    bricks_per_pe: int = field(default=4, metadata=doc("bricks per PE (4: one 4x4-bit MAC per cycle)"))
    clock_mhz: float = field(default=500.0, metadata=doc("clock for the latency figure"))
    buffer_kib: float = field(default=128.0, metadata=doc(
        "on-chip activation buffer: a layer whose input + output do not fit goes through DRAM"))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (for the input shape)"))
    device: str = field(default="auto", metadata=doc(
        DEVICE_HELP + "; checked, but the cost model counts on the CPU whatever it says", DEVICES))

    def __post_init__(self) -> None:
        check_device(self.device)
        for name in ("pe_rows", "pe_cols", "brick_bits", "bricks_per_pe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.clock_mhz > 0:
            raise ConfigError(f"clock_mhz must be > 0, got {self.clock_mhz}")
        if not self.buffer_kib >= 0:
            raise ConfigError(f"buffer_kib must be >= 0, got {self.buffer_kib}")

    def pe(self):
        from ..hw import PEArray

        return PEArray(rows=self.pe_rows, cols=self.pe_cols, brick_bits=self.brick_bits,
                       bricks_per_pe=self.bricks_per_pe, clock_mhz=self.clock_mhz, buffer_kib=self.buffer_kib)


def run_cost(cfg: CostOptions) -> dict[str, Any]:
    """Hardware cost of a checkpoint and of the same network in FP32 (per image); OUT/cost.{json,md}."""
    from ..hw import cost_report
    from ..report.markdown import markdown_table

    resolve_device(cfg.device)  # checked only: the cost model counts on the CPU
    if cfg.out:
        check_output_dir(cfg.out)
    model, ck = load_model(cfg.checkpoint)
    example = next(iter(checkpoint_loaders(ck, cfg.data_dir, 1).test))[0][:1]
    pe = cfg.pe()
    rep = cost_report(model, example, pe)
    fp32 = cost_report(create_model_from_args(ck["model_args"]).eval(), example, pe)["total"]
    t = rep["total"]
    t["x_fp32_energy"] = t["e_total_pj"] / fp32["e_total_pj"]
    rep.update(checkpoint=str(cfg.checkpoint), fp32_total=fp32)
    cols = [("layer", "layer"), ("macs", "MACs"), ("w_bits", "W bits"), ("a_bits", "A bits"),
            ("acc_bits", "acc bits"), ("stored_bits", "stored bits"), ("cycles", "cycles"),
            ("e_compute_pj", "compute pJ"), ("e_sram_pj", "SRAM pJ"), ("e_dram_pj", "DRAM pJ")]
    summary = (f"{cfg.checkpoint}: {t['macs'] / 1e6:.2f} M MACs/image, {t['stored_bits'] / 8192:.1f} KiB stored "
               f"(compression {t['compression_ratio']:.2f}x vs FP32), {t['cycles']} cycles "
               f"({t['latency_us']:.1f} us at {pe.clock_mhz:g} MHz), "
               f"{t['energy_uj']:.2f} uJ/image ({t['x_fp32_energy']:.3f}x FP32: compute "
               f"{t['e_compute_pj'] / 1e6:.2f}, SRAM {t['e_sram_pj'] / 1e6:.2f}, DRAM {t['e_dram_pj'] / 1e6:.2f} uJ)")
    md = f"# Hardware cost\n\n{summary}\n\n{markdown_table(rep['layers'], cols, digits=1)}\n"
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "cost.json", rep)
        atomic_write_text(out / "cost.md", md)
        save_config(out, cfg)
    print(summary)
    return rep

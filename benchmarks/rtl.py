"""Gate cost of the rounding stage of an 8-bit quantizer: RNE vs RTZ vs SR, from Amaranth RTL via Yosys.

Units (:mod:`hwquant.export.rtl`): signed fixed-point input ``x`` (``in_width`` bits, ``frac_bits`` of them
fractional) to a saturated signed 8-bit code, for three input formats: ``i12 f4`` and ``i16 f8`` (integer part
exactly 8 bits, so only rounding up past 127 saturates) and ``i16 f4`` (12 integer bits: real saturation logic).
Per format:

* ``nearest`` (RNE, guard/sticky/LSB), ``zero`` (RTZ, sign & any-fraction), ``floor`` (no rounding: the
  saturation every unit shares, a baseline);
* ``stochastic`` with the smallest LFSR (``frac_bits`` state bits; 2^F - 1 period) and with a 16-bit LFSR
  (the usual practical choice), one LFSR step per clock.

Each unit is first **simulated** with Amaranth's Python simulator and compared bit for bit with hwquant's
numerics (``quantize(x * 2^-F, 1.0, 8, rounding=mode)``; SR: ``quantize(x + r 2^-F, 1.0, 8, "floor")`` with the
reference LFSR noise ``r``): every input of the format in full mode (4,096 / 65,536 vectors) and for the 12-bit
format in quick mode; edge cases plus 2,000 random ones for the 16-bit formats in quick mode.  Then it is
**synthesized** with Yosys (``synth -flatten``; ``abc -g`` two-input gates + MUX; ``stat``) and, separately,
mapped to NAND2 only.  Reported: total cells, combinational gates, flip-flops, NAND2 count, longest
combinational path (cells), cell types, and cells / NAND2 relative to RNE of the same format.  Without a Yosys
that can synthesize, the simulation results are still written and the table says "no synthesizer".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwquant.errors import HwquantError
from hwquant.export import rtl
from hwquant.numerics import quantize

from .common import markdown_table, write_results

NAME = "rtl"
OUT_WIDTH = 8
FORMATS: list[tuple[int, int]] = [(12, 4), (16, 8), (16, 4)]  # (in_width, frac_bits); i16 f4 really saturates
VARIANTS: list[tuple[str, str, int | None]] = [  # (label, mode, lfsr_width)
    ("RNE", "nearest", None),
    ("RTZ", "zero", None),
    ("SR (LFSR F bits)", "stochastic", None),
    ("SR (LFSR 16)", "stochastic", 16),
    ("floor (baseline)", "floor", None),
]
SR_SEED = 0xACE1


def _vectors(p: rtl.RoundingUnitParams, quick: bool) -> np.ndarray:
    """Every input in full mode (and for <= 12-bit inputs); else extremes, ties +-1 LSB around the code range
    and 2,000 random ones."""
    xmin, xmax = p.xrange
    if not quick or p.in_width <= 12:
        return np.arange(xmin, xmax + 1, dtype=np.int64)
    one, half = 1 << p.frac_bits, (1 << p.frac_bits) >> 1
    qmin, qmax = p.qrange
    vals = [xmin, xmax, 0]
    for k in range(qmin - 2, qmax + 3):
        for base in (k * one, k * one + half):
            vals += [base - 1, base, base + 1]
    rnd = np.random.default_rng(0).integers(xmin, xmax, 2000, endpoint=True)
    x = np.concatenate([np.asarray(vals, dtype=np.int64), rnd])
    return x[(x >= xmin) & (x <= xmax)]


def _oracle(p: rtl.RoundingUnitParams, x: np.ndarray) -> np.ndarray:
    """hwquant's codes for raw inputs ``x`` (float64, exact); SR with the unit's reference LFSR noise."""
    v = torch.from_numpy(x).to(torch.float64) * 2.0**-p.frac_bits
    if p.mode == "stochastic":
        u = torch.from_numpy(rtl.lfsr_noise(p, len(x))).to(torch.float64) * 2.0**-p.frac_bits
        return quantize(v + u, 1.0, p.out_width, rounding="floor").to(torch.int64).numpy()
    return quantize(v, 1.0, p.out_width, rounding=p.mode).to(torch.int64).numpy()


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    synth_error: str | None = None
    yosys = None
    for in_width, frac_bits in FORMATS:
        fmt_rows = []
        for label, mode, lfsr_width in VARIANTS:
            lw = lfsr_width or max(frac_bits, 2)
            kw = {"lfsr_width": lw, "seed": SR_SEED & (2**lw - 1) or 1} if mode == "stochastic" else {}
            p = rtl.RoundingUnitParams(in_width, frac_bits, OUT_WIDTH, mode, **kw)
            x = _vectors(p, quick)
            t0 = time.perf_counter()
            got = rtl.simulate(p, x)
            sim_s = time.perf_counter() - t0
            mismatches = int(np.count_nonzero(got != _oracle(p, x)))
            row: dict[str, Any] = {
                "format": f"i{in_width} f{frac_bits} -> o{OUT_WIDTH}", "unit": label, "mode": mode,
                "in_width": in_width, "frac_bits": frac_bits, "out_width": OUT_WIDTH,
                "lfsr_width": p.lfsr_width, "module": p.name(), "vectors": len(x), "mismatches": mismatches,
                "sim": "pass" if mismatches == 0 else "FAIL", "sim_s": sim_s,
            }
            if synth_error is None:
                try:
                    s = rtl.synthesize(p)
                    yosys = s["yosys"]
                    row.update(cells=s["cells"], gates=s["gates"], flip_flops=s["flip_flops"], nand2=s["nand2"],
                               nand2_total=s["nand2"] + s["nand2_flip_flops"], depth=s["depth"],
                               by_type=s["by_type"],
                               types=", ".join(f"{k} {v}" for k, v in sorted(s["by_type"].items())))
                except HwquantError as e:
                    synth_error = str(e)
            if synth_error is not None:
                row["types"] = "no synthesizer"
            fmt_rows.append(row)
        base = fmt_rows[0]  # RNE of this format
        for row in fmt_rows:
            row["x_rne_cells"] = _ratio(row.get("cells"), base.get("cells"))
            row["x_rne_nand2"] = _ratio(row.get("nand2_total"), base.get("nand2_total"))
        rows += fmt_rows

    synth_line = (f"Synthesizer: {yosys}; `synth -flatten`, `abc -g {rtl.GATE_LIBRARY}` (each one cell), and a "
                  "separate NAND2-only mapping (`abc -g NAND`; `NAND2+FF` adds the flip-flops)."
                  if synth_error is None else f"**No synthesizer**: {synth_error}; simulation results only.")
    md = "\n".join([
        f"Rounding stage of a signed {OUT_WIDTH}-bit quantizer (combinational, saturating), Amaranth "
        f"{_amaranth_version()}. `sim`: bit-exact against `hwquant.numerics.quantize` on `vectors` inputs "
        f"({'edge cases + 2,000 random for 16-bit inputs' if quick else 'every input'}). "
        f"SR: Galois LFSR, seed {SR_SEED:#x} (its low bits for a narrower LFSR), one step per clock. "
        "`x RNE`: relative to round-to-nearest-even of the same format. A flip-flop counts as one cell (and one "
        "in `NAND2+FF`); in a standard-cell library a resettable DFF is about 5-6 NAND2 equivalents of area, so "
        "SR's real area ratio is higher than shown.",
        "",
        synth_line,
        "",
        markdown_table(rows, [("format", "format"), ("unit", "unit"), ("sim", "sim"), ("vectors", "vectors"),
                              ("cells", "cells"), ("gates", "comb gates"), ("flip_flops", "FFs"),
                              ("x_rne_cells", "x RNE cells"), ("nand2_total", "NAND2+FF"),
                              ("x_rne_nand2", "x RNE NAND2"), ("depth", "depth"), ("types", "cell types")]),
        "",
    ])
    results = {"quick": quick, "out_width": OUT_WIDTH, "synthesizer": yosys, "synth_error": synth_error,
               "gate_library": rtl.GATE_LIBRARY, "all_pass": all(r["mismatches"] == 0 for r in rows), "rows": rows}
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}


def _amaranth_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amaranth")
    except PackageNotFoundError:
        return "?"

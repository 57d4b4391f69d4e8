"""Fixed-point fractional-length search checked against an independent numpy brute force and a hand case."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hwquant.errors import ConfigError, DataError
from hwquant.numerics import (
    best_fraction_length,
    best_fraction_length_per_channel,
    fixed_point_scale,
    fl_search_range,
    fraction_length_errors,
)


def brute_force_fl(x: np.ndarray, bits: int, signed: bool) -> tuple[int, dict]:
    """Best FL over every integer in [-20, 40], saturating quantizer written in float64 numpy; ties -> larger FL."""
    x64 = x.astype(np.float64)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    errs = {}
    for fl in range(-20, 41):
        x_hat = np.clip(np.round(x64 * 2.0**fl), qmin, qmax) * 2.0**-fl
        errs[fl] = float(np.mean((x64 - x_hat) ** 2))
    m = min(errs.values())
    return max(fl for fl, e in errs.items() if e == m), errs


def _draw(rng: np.random.Generator, kind: int, n: int, scale: float) -> np.ndarray:
    x = {
        0: lambda: rng.standard_normal(n),
        1: lambda: rng.uniform(-1, 1, n),
        2: lambda: rng.laplace(size=n),
        3: lambda: rng.standard_t(3, n),
        4: lambda: rng.standard_normal(n) ** 3,  # very heavy tails
    }[kind]()
    return (x * scale).astype(np.float32)


def test_hand_case():
    # x = [0.3, -1.2, 0.9], 4 bits signed (codes -8..7); max|x| = 1.2 -> FL_0 = 4 - 1 - ceil(log2 1.2) = 2.
    # FL=1 (step .5):  0.5, -1.0, 1.0      -> errors .04, .04, .01         mean .03
    # FL=2 (step .25): 0.25, -1.25, 1.0    -> errors .0025, .0025, .01     mean .005
    # FL=3 (step .125, range [-1, .875]): 0.25, -1.0 (clipped), .875 -> .0025, .04, .000625  mean .014375
    x = torch.tensor([0.3, -1.2, 0.9])
    assert fl_search_range(x, 4) == range(-1, 6)
    errs = fraction_length_errors(x, 4, [1, 2, 3])
    assert errs[1] == pytest.approx(0.03, rel=1e-6)
    assert errs[2] == pytest.approx(0.005, rel=1e-5)
    assert errs[3] == pytest.approx(0.014375, rel=1e-5)
    assert best_fraction_length(x, 4) == 2


def test_scale_and_center():
    assert fixed_point_scale(3) == 0.125 and fixed_point_scale(-2) == 4.0 and fixed_point_scale(0) == 1.0
    # powers of two: ceil(log2 1) = 0, ceil(log2 2) = 1 (exact, no float log)
    assert fl_search_range(torch.tensor([1.0]), 8, radius=0) == range(7, 8)
    assert fl_search_range(torch.tensor([-2.0]), 8, radius=0) == range(6, 7)
    assert fl_search_range(torch.tensor([2.0001]), 8, radius=0) == range(5, 6)
    # unsigned: bits - ceil(log2 max x), negatives ignored
    assert fl_search_range(torch.tensor([0.3, 0.9, -5.0]), 4, signed=False, radius=0) == range(4, 5)
    # all zero: centred as if max = 1; every FL is exact, so the tie rule picks the largest FL in range
    z = torch.zeros(5)
    assert fl_search_range(z, 8, radius=1) == range(6, 9)
    assert best_fraction_length(z, 8, radius=1) == 8


@pytest.mark.parametrize("trial", range(40))
def test_equals_brute_force_over_all_fls(trial):
    rng = np.random.default_rng(1000 + trial)
    kind = trial % 5
    n = int(rng.integers(1, 3000))
    bits = int(rng.integers(2, 17))
    signed = trial % 3 != 0
    x = _draw(rng, kind, n, 10.0 ** rng.uniform(-4, 4))
    if not signed:
        x = np.abs(x)
    expected, errs = brute_force_fl(x, bits, signed)
    got = best_fraction_length(torch.from_numpy(x), bits, signed)
    assert got == expected
    # our per-FL errors equal the brute force's
    ours = fraction_length_errors(torch.from_numpy(x), bits, fl_search_range(torch.from_numpy(x), bits, signed), signed)
    for fl, e in ours.items():
        assert e == pytest.approx(errs[fl], rel=1e-12, abs=0.0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.integers(0, 4),
    n=st.integers(1, 500),
    bits=st.integers(2, 16),
    log_scale=st.floats(-5, 5),
    signed=st.booleans(),
)
def test_equals_brute_force_hypothesis(seed, kind, n, bits, log_scale, signed):
    x = _draw(np.random.default_rng(seed), kind, n, 10.0**log_scale)
    if not signed:
        x = np.abs(x)
    assert best_fraction_length(torch.from_numpy(x), bits, signed) == brute_force_fl(x, bits, signed)[0]


def test_per_channel_equals_per_tensor_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 5, 3, 3, generator=g) * torch.logspace(-3, 2, 12).reshape(12, 1, 1, 1)
    w[3] = 0.0  # an all-zero channel
    for bits in (3, 5, 8):
        fl = best_fraction_length_per_channel(w, bits)
        assert fl.dtype == torch.long and fl.shape == (12,)
        assert fl.tolist() == [best_fraction_length(w[c], bits) for c in range(12)]
    w1 = w.transpose(0, 1).contiguous()  # channels on axis 1
    assert torch.equal(best_fraction_length_per_channel(w1, 6, axis=1), best_fraction_length_per_channel(w, 6))


def test_errors():
    with pytest.raises(DataError):
        best_fraction_length(torch.tensor([]), 8)
    with pytest.raises(DataError):
        best_fraction_length(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ConfigError):
        best_fraction_length(torch.tensor([1.0]), 1)
    with pytest.raises(ConfigError):
        best_fraction_length(torch.tensor([1.0]), 8, radius=-1)
    with pytest.raises(ConfigError):
        best_fraction_length(torch.tensor([1.0]), 8, rounding="up")
    with pytest.raises(ConfigError):
        fixed_point_scale(1.5)

"""GGD observer: its step is ggd_optimal_step of its own fit, and it is near the best uniform step on the data."""

import math

import numpy as np
import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.numerics import GGD, fake_quantize, ggd_fit, ggd_optimal_step, sqnr_db
from hwquant.observers import make_observer
from hwquant.spec import QuantSpec

DISTS = [
    GGD(1.0, 0.0, 1.0, 0.0, True),  # Laplace
    GGD(2.0, 0.0, 0.5, 0.0, True),  # Gaussian
    GGD(0.7, 0.3, 2.0, 0.0, True),  # heavy tails
    GGD(1.3, 0.6, 1.0, 0.45, False),  # post-ReLU-like: 45% zeros, one-sided
]


def _obs(bits=8, signed=None, **args):
    return make_observer(QuantSpec(bits=bits, signed=signed, observer="ggd", observer_args=args))


def test_step_is_optimal_step_of_its_fit():
    x = torch.from_numpy(DISTS[3].sample(150_000, seed=1)).float()
    obs = _obs(bits=6)
    for chunk in x.split(40_000):
        obs.update(chunk)
    params = obs.compute()
    assert not params.signed and int(params.zero_point) == 0
    g = obs.ggd
    assert isinstance(g, GGD) and not g.signed
    assert g.zero_mass == pytest.approx(float((x == 0).double().mean()), abs=1e-12)
    # the density fit is ggd_fit on the non-zero values (everything fits in the reservoir)
    ref = ggd_fit(x[x != 0])
    assert (g.alpha, g.beta, g.lam) == pytest.approx((ref.alpha, ref.beta, ref.lam), rel=1e-12)
    assert float(params.scale) == pytest.approx(ggd_optimal_step(g, 6, False), rel=1e-7)
    assert float(obs.step) == float(params.scale)
    s = obs.summary()
    assert s["alpha"] == g.alpha and s["zero_mass"] == g.zero_mass and s["step"] == float(params.scale)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("dist", DISTS, ids=["laplace", "gauss", "heavy", "relu"])
def test_sqnr_near_best_uniform_step_and_above_minmax(dist, bits):
    x = torch.from_numpy(dist.sample(100_000, seed=bits)).float()
    obs = _obs(bits=bits)
    obs.update(x)
    p = obs.compute()
    signed = p.signed
    assert signed == dist.signed
    ours = sqnr_db(x, fake_quantize(x, p.scale, bits, signed))
    step = float(p.scale)
    grid = np.geomspace(step / 3, step * 3, 500)
    best = max(sqnr_db(x, fake_quantize(x, float(s), bits, signed)) for s in grid)
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    minmax = sqnr_db(x, fake_quantize(x, float(x.abs().max()) / qmax, bits, signed))
    assert ours >= best - 0.2
    assert ours > minmax


def test_power_of_two_step_on_the_reservoir():
    x = torch.from_numpy(DISTS[0].sample(50_000, seed=4)).float()
    obs = _obs(bits=5, power_of_two=True)
    obs.update(x)
    step = float(obs.compute().scale)
    assert math.log2(step) == round(math.log2(step))
    g = obs.ggd
    free = ggd_optimal_step(g, 5, True)
    lo, hi = 2.0 ** math.floor(math.log2(free)), 2.0 ** math.ceil(math.log2(free))
    err = {c: float((fake_quantize(x, c, 5, True) - x).double().pow(2).mean()) for c in (lo, hi)}
    assert step == min(err, key=err.get)


def test_per_channel_fits_and_degenerate_rows():
    rng = np.random.default_rng(0)
    w = rng.laplace(size=(4, 3, 5, 5)) * np.array([1.0, 0.1, 3.0, 1.0]).reshape(4, 1, 1, 1)
    w[3] = 0.0  # dead channel: nothing to fit
    w = torch.from_numpy(w.astype(np.float32))
    obs = make_observer(QuantSpec(bits=4, granularity="channel", observer="ggd"), axis=0)
    obs.update(w)
    p = obs.compute()
    assert p.scale.shape == (4,) and p.zero_point.shape == (4,) and p.axis == 0
    assert isinstance(obs.ggd, list) and obs.ggd[3] is None and float(p.scale[3]) == 1.0
    peak = w.abs().amax(dim=(1, 2, 3))
    for c in range(3):  # the GGD step, capped at the min-max step peak / q_max
        ref = min(ggd_optimal_step(obs.ggd[c], 4, True), float(peak[c]) / 7)
        assert float(p.scale[c]) == pytest.approx(ref, rel=1e-6)
    assert float(p.scale[1]) < float(p.scale[0]) < float(p.scale[2])
    # a single repeated magnitude falls back to the min-max step
    one = _obs(bits=4, signed=True)
    one.update(torch.tensor([0.5, -0.5, 0.0, 0.5]))
    assert float(one.compute().scale) == pytest.approx(0.5 / 7) and one.ggd is None


def test_cap_at_peak():
    # 40 Gaussian values: the fitted tail reaches beyond the largest one, so the free GGD step exceeds peak / q_max
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    capped, free = _obs(bits=8, signed=True), _obs(bits=8, signed=True, cap_at_peak=False)
    capped.update(x)
    free.update(x)
    s_cap, s_free = float(capped.compute().scale), float(free.compute().scale)
    mm = float(x.abs().max()) / 127
    assert s_free == pytest.approx(ggd_optimal_step(free.ggd, 8, True), rel=1e-6)
    assert s_free > mm and s_cap == pytest.approx(mm)


def test_affine_spec_and_bad_args():
    x = torch.from_numpy(DISTS[0].sample(20_000, seed=5)).float() + 0.5
    obs = make_observer(QuantSpec(bits=8, symmetric=False, observer="ggd"))
    obs.update(x)
    p = obs.compute()
    lo, hi = max(-float(obs.clip), float(x.min())), min(float(obs.clip), float(x.max()))
    assert float(p.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
    for args in ({"power_of_two": "yes"}, {"cap_at_peak": 1}, {"method": "em"}, {"max_samples": 1}, {"bogus": 1}):
        with pytest.raises(ConfigError):
            make_observer(QuantSpec(observer="ggd", observer_args=args))

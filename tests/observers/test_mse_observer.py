"""MSE observer: the chosen clip is the argmin of an independent numpy brute force over the same grid."""

import numpy as np
import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.observers import make_observer
from hwquant.spec import QuantSpec


def brute_mse(x: np.ndarray, clip: float, bits: int, signed: bool) -> float:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = clip / qmax
    x_hat = np.clip(np.round(x / s), qmin, qmax) * s
    return float(np.mean((x - x_hat) ** 2))


@pytest.mark.parametrize("bits,signed", [(4, True), (8, True), (3, False), (6, False)])
def test_clip_is_brute_force_argmin(bits, signed):
    rng = np.random.default_rng(bits)
    x = rng.laplace(size=60_000)
    if not signed:
        x = np.maximum(x, 0)
    x = x.astype(np.float32)
    obs = make_observer(QuantSpec(bits=bits, signed=signed, observer="mse"))
    for chunk in torch.from_numpy(x).split(25_000):
        obs.update(chunk)
    obs.compute()
    x64 = x.astype(np.float64)
    peak = np.abs(x64).max() if signed else x64.max()
    grid = np.linspace(0.2, 1.0, 100) * peak
    errs = np.array([brute_mse(x64, c, bits, signed) for c in grid])
    chosen = float(obs.clip)
    assert brute_mse(x64, chosen, bits, signed) <= errs.min() * (1 + 1e-6)
    assert chosen == pytest.approx(grid[np.argmin(errs)], rel=1e-5)
    assert chosen < peak  # heavy-ish tails: clipping pays off


def test_per_channel_argmin_and_grid_args():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((5, 300)) * np.array([[0.1], [1], [10], [0.01], [3]])).astype(np.float32)
    obs = make_observer(QuantSpec(bits=4, granularity="channel", observer="mse",
                                  observer_args={"grid": 50, "min_frac": 0.1}))
    obs.update(torch.from_numpy(w))
    params = obs.compute()
    assert params.scale.shape == (5,)
    for r in range(5):
        x = w[r].astype(np.float64)
        grid = np.linspace(0.1, 1.0, 50) * np.abs(x).max()
        errs = np.array([brute_mse(x, c, 4, True) for c in grid])
        assert brute_mse(x, float(obs.clip[r]), 4, True) <= errs.min() * (1 + 1e-6)


def test_bad_args():
    with pytest.raises(ConfigError):
        make_observer(QuantSpec(observer="mse", observer_args={"grid": 0}))
    with pytest.raises(ConfigError):
        make_observer(QuantSpec(observer="mse", observer_args={"min_frac": 0.0}))


@pytest.mark.parametrize("bits,signed", [(4, False), (5, True)])
def test_pow2_step_is_brute_force_argmin_over_powers_of_two(bits, signed):
    """pow2 specs search the powers of two themselves; the log-rounded free MSE step is often the worse one."""
    rng = np.random.default_rng(7)
    scales = np.array([[0.03], [0.7], [1.0], [5.0], [0.2], [11.0], [0.5], [2.5]])
    w = rng.laplace(size=(8, 4000)) * scales
    if not signed:
        w = np.maximum(w, 0)
    w = w.astype(np.float32)
    spec = QuantSpec(bits=bits, signed=signed, granularity="channel", observer="mse", pow2=True)
    obs = make_observer(spec)
    obs.update(torch.from_numpy(w))
    params = obs.compute()
    free = make_observer(spec.with_(pow2=False))
    free.update(torch.from_numpy(w))
    free.compute()
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    worse_rounded = 0
    for r in range(8):
        x = w[r].astype(np.float64)
        peak = np.abs(x).max()
        ks = np.arange(np.floor(np.log2(0.2 * peak / qmax)), np.ceil(np.log2(peak / qmax)) + 1)
        errs = np.array([brute_mse(x, 2.0**k * qmax, bits, signed) for k in ks])
        step = float(params.scale[r])
        assert np.log2(step) == ks[np.argmin(errs)]  # an exact power of two, the argmin
        rounded = 2.0 ** np.round(np.log2(float(free.clip[r]) / qmax))
        e_rounded = brute_mse(x, rounded * qmax, bits, signed)
        assert errs.min() <= e_rounded * (1 + 1e-9)
        worse_rounded += errs.min() < e_rounded * (1 - 1e-3)
    assert worse_rounded >= 1  # the case this search exists for occurs in this data

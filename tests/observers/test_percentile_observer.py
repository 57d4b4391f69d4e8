"""Percentile observer against numpy.percentile on the same data."""

import numpy as np
import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.observers import make_observer
from hwquant.spec import QuantSpec


def _data(n=100_000, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_t(3, n).astype(np.float32))


@pytest.mark.parametrize("p", [99.99, 99.9, 50.0, 100.0])
def test_signed_clip_equals_numpy(p):
    x = _data()
    obs = make_observer(QuantSpec(bits=8, observer="percentile", observer_args={"percentile": p}))
    for chunk in x.split(30_000):
        obs.update(chunk)
    params = obs.compute()
    c = np.percentile(np.abs(x.numpy()).astype(np.float64), p)
    assert float(obs.clip) == pytest.approx(c, rel=1e-6)
    assert float(params.scale) == pytest.approx(c / 127, rel=1e-6)
    assert obs.summary()["clip"] == pytest.approx(c, rel=1e-6)


def test_unsigned_and_affine():
    x = torch.relu(_data(seed=1)) + 0.5
    obs = make_observer(QuantSpec(bits=4, signed=None, observer="percentile", observer_args={"percentile": 99.0}))
    obs.update(x)
    params = obs.compute()
    assert not params.signed
    assert float(params.scale) == pytest.approx(np.percentile(x.numpy().astype(np.float64), 99.0) / 15, rel=1e-6)
    # affine: both tails
    y = _data(seed=2) + 3.0
    obs = make_observer(QuantSpec(bits=8, symmetric=False, observer="percentile", observer_args={"percentile": 99.5}))
    obs.update(y)
    params = obs.compute()
    lo, hi = np.percentile(y.numpy().astype(np.float64), [0.5, 99.5])
    assert float(params.scale) == pytest.approx((hi - min(lo, 0)) / 255, rel=1e-5)


def test_per_channel_equals_numpy_rows():
    w = torch.from_numpy(np.random.default_rng(3).laplace(size=(6, 4, 5, 5)).astype(np.float32))
    obs = make_observer(QuantSpec(bits=6, granularity="channel", observer="percentile",
                                  observer_args={"percentile": 95.0}), axis=0)
    obs.update(w)
    params = obs.compute()
    ref = np.percentile(np.abs(w.numpy().reshape(6, -1)).astype(np.float64), 95.0, axis=1) / 31
    np.testing.assert_allclose(params.scale.numpy(), ref, rtol=1e-6)


def test_bad_percentile():
    for bad in (0, 101, "high", True):
        with pytest.raises(ConfigError):
            make_observer(QuantSpec(observer="percentile", observer_args={"percentile": bad}))

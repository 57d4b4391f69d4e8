"""Behaviour shared by every sample-based observer: streaming, determinism, errors, shapes, registry."""

import pytest
import torch

from hwquant.errors import ConfigError, DataError
from hwquant.observers import OBSERVERS, make_observer
from hwquant.spec import QuantSpec

NAMES = ["percentile", "mse", "kl", "aciq", "ggd"]


def _data(n=60_000, seed=0):
    """Heavy-tailed test data: cubes of standard normals."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) ** 3


def test_registered():
    for name in NAMES + ["minmax"]:
        assert name in OBSERVERS and OBSERVERS[name].name == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("signed", [True, None])
def test_streaming_equals_one_big_update(name, signed):
    x = _data()
    if signed is None:
        x = torch.relu(x)
    spec = QuantSpec(bits=6, signed=signed, observer=name)
    one = make_observer(spec)
    one.update(x.reshape(60, 1000))
    many = make_observer(spec)
    for chunk in x.split(7_000):
        many.update(chunk)
    a, b = one.compute(), many.compute()
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert a.signed == b.signed == (signed is not None)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed_when_subsampling(name):
    x = _data(200_000, seed=1)
    spec = QuantSpec(bits=4, observer=name, observer_args={"reservoir_size": 5_000, "seed": 3})

    def run():
        o = make_observer(spec)
        for chunk in x.split(30_000):
            o.update(chunk)
        return o.compute().scale

    assert torch.equal(run(), run())
    o = make_observer(spec)
    o.update(x)
    assert o.samples().shape == (1, 5_000)


@pytest.mark.parametrize("name", NAMES)
def test_nan_empty_and_unknown_args(name):
    o = make_observer(QuantSpec(observer=name))
    with pytest.raises(DataError):
        o.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(DataError):
        make_observer(QuantSpec(observer=name)).compute()
    with pytest.raises(ConfigError):
        make_observer(QuantSpec(observer=name, observer_args={"no_such_arg": 1}))
    with pytest.raises(ConfigError):
        make_observer(QuantSpec(observer=name, observer_args={"reservoir_size": 0}))


@pytest.mark.parametrize("name", NAMES)
def test_per_channel_shapes(name):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    o = make_observer(QuantSpec(bits=4, granularity="channel", observer=name))
    o.update(w)
    p = o.compute()
    assert p.axis == 0 and p.scale.shape == (8,) and p.zero_point.shape == (8,)
    assert torch.all(p.scale > 0) and torch.all(p.scale <= w.abs().amax(dim=(1, 2, 3)) / 7 + 1e-7)
    o1 = make_observer(QuantSpec(bits=4, granularity="channel", observer=name), axis=1)
    o1.update(w)
    assert o1.compute().scale.shape == (4,)
    # per-tensor gives 0-d params
    t = make_observer(QuantSpec(bits=4, observer=name))
    t.update(w)
    assert t.compute().scale.shape == ()


@pytest.mark.parametrize("name", NAMES)
def test_reset(name):
    o = make_observer(QuantSpec(bits=4, observer=name))
    o.update(_data(5_000) * 100)
    o.reset()
    x = _data(5_000)
    o.update(x)
    fresh = make_observer(QuantSpec(bits=4, observer=name))
    fresh.update(x)
    assert torch.equal(o.compute().scale, fresh.compute().scale)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("signed", [True, False])
def test_affine_specs(name, signed):
    x = _data(20_000, seed=4) + 2.0  # mostly positive, some negatives
    o = make_observer(QuantSpec(bits=5, signed=signed, symmetric=False, observer=name))
    o.update(x)
    p = o.compute()
    assert float(p.scale) > 0 and p.qmin <= int(p.zero_point) <= p.qmax
    # the installed range stays inside what was observed (widened to contain 0)
    lo, hi = (p.qmin - int(p.zero_point)) * float(p.scale), (p.qmax - int(p.zero_point)) * float(p.scale)
    assert lo >= min(float(x.min()), 0.0) - float(p.scale) and hi <= float(x.max()) + float(p.scale)

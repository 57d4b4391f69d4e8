"""Reservoir sampler: exact while it fits, bounded and uniform beyond, deterministic given the seed."""

import numpy as np
import pytest
import torch
from scipy import stats

from hwquant.errors import ConfigError
from hwquant.observers import Reservoir


def test_keeps_everything_in_order_while_it_fits():
    r = Reservoir(capacity=1000, seed=3)
    x = torch.arange(900, dtype=torch.float32)
    for chunk in x.split(128):
        r.add(chunk.reshape(1, -1))
    assert torch.equal(r.values(), x.reshape(1, -1))
    assert r.seen == 900


def test_does_not_alias_the_callers_buffer():
    r = Reservoir(capacity=10)
    buf = torch.ones(1, 5)
    r.add(buf)
    buf.fill_(7.0)
    assert torch.equal(r.values(), torch.ones(1, 5))


def test_bounded_uniform_subsample():
    n, cap = 200_000, 5_000
    r = Reservoir(capacity=cap, seed=0)
    x = torch.arange(n, dtype=torch.float32)
    for chunk in x.split(7_919):  # uneven batches
        r.add(chunk.reshape(1, -1))
    kept = r.values()[0]
    assert kept.numel() == cap
    assert torch.unique(kept).numel() == cap  # without replacement
    assert torch.all(kept[1:] > kept[:-1])  # arrival order
    # uniform over the whole stream: chi-square over 20 equal slices of the index range
    counts = np.histogram(kept.numpy(), bins=20, range=(0, n))[0]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_deterministic_given_seed_and_per_row():
    x = torch.randn(3, 50_000, generator=torch.Generator().manual_seed(1))

    def run(seed):
        r = Reservoir(capacity=1_000, seed=seed)
        for chunk in x.split(10_000, dim=1):
            r.add(chunk)
        return r.values()

    a, b, c = run(5), run(5), run(6)
    assert a.shape == (3, 1_000)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in range(3):  # every kept value comes from its own row
        assert torch.isin(a[row], x[row]).all()


def test_bad_arguments():
    with pytest.raises(ConfigError):
        Reservoir(capacity=0)
    with pytest.raises(ConfigError):
        Reservoir(seed=-1)
    r = Reservoir(capacity=10)
    r.add(torch.zeros(2, 3))
    with pytest.raises(ConfigError):
        r.add(torch.zeros(3, 3))

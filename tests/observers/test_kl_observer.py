"""KL (entropy) observer: vectorised divergences equal a loop transcription of MXNet's reference, and the
threshold behaves as expected on hand-checkable data."""

import numpy as np
import pytest
import torch
from scipy import stats

from hwquant.observers import make_observer
from hwquant.observers.kl import kl_divergences, kl_threshold_bins
from hwquant.spec import QuantSpec


def _smooth_ref(p, eps=1e-4):
    is_zeros = (p == 0).astype(np.float64)
    is_nonzeros = (p != 0).astype(np.float64)
    n_zeros = is_zeros.sum()
    n_nonzeros = p.size - n_zeros
    if not n_nonzeros:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    hist = p.astype(np.float64) + eps * is_zeros - eps1 * is_nonzeros
    return None if (hist <= 0).any() else hist


def reference_divergences(hist, levels):
    """MXNet ``_get_optimal_threshold`` loop for a one-sided histogram (float64 instead of float32)."""
    hist = np.asarray(hist, dtype=np.float64)
    out = []
    for i in range(levels, hist.size + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        is_nonzeros = (p != 0).astype(np.int64)
        merged = i // levels
        qb = np.array([sliced[j * merged:(j + 1) * merged].sum() for j in range(levels)])
        qb[-1] += sliced[levels * merged:].sum()
        q = np.zeros(i)
        for j in range(levels):
            start = j * merged
            stop = i if j == levels - 1 else start + merged
            norm = is_nonzeros[start:stop].sum()
            if norm:
                q[start:stop] = qb[j] / norm
        q[p == 0] = 0
        ps, qs = _smooth_ref(p), _smooth_ref(q)
        out.append(np.inf if ps is None or qs is None else stats.entropy(ps, qs))
    return np.array(out)


@pytest.mark.parametrize("levels", [8, 16, 128])
def test_vectorised_equals_reference_loop(levels):
    rng = np.random.default_rng(levels)
    data = np.abs(rng.standard_t(4, 20_000))
    hist = np.histogram(data, bins=512, range=(0, data.max()))[0]
    ours = kl_divergences(hist, levels, np.arange(levels, 513))
    ref = reference_divergences(hist, levels)
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(ours))
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-9, atol=1e-12)
    assert kl_threshold_bins(hist, levels, start_bin=1) == levels + int(np.argmin(ref))
    assert kl_threshold_bins(hist, levels, start_bin=200) == max(200, levels) + int(np.argmin(ref[max(200, levels)
                                                                                                   - levels:]))


def test_uniform_data_threshold_near_max():
    x = torch.rand(500_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    obs = make_observer(QuantSpec(bits=8, observer="kl"))
    obs.update(x)
    params = obs.compute()
    assert float(obs.clip) >= 0.95 * float(x.abs().max())
    assert float(params.scale) == pytest.approx(float(obs.clip) / 127, rel=1e-6)


def test_heavy_tails_clip_well_below_max():
    x = torch.from_numpy(np.random.default_rng(1).standard_t(2, 500_000).astype(np.float32))
    for bits in (4, 8):
        obs = make_observer(QuantSpec(bits=bits, observer="kl"))
        obs.update(x)
        obs.compute()
        assert float(obs.clip) < 0.2 * float(x.abs().max())


def test_unsigned_levels_and_degenerate():
    # unsigned uses 2^b levels; with 2^b >= bins no candidate clips
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(2))
    obs = make_observer(QuantSpec(bits=8, signed=None, observer="kl", observer_args={"bins": 256}))
    obs.update(x)
    params = obs.compute()
    assert not params.signed and float(obs.clip) == pytest.approx(float(x.max()))
    z = make_observer(QuantSpec(bits=8, observer="kl"))
    z.update(torch.zeros(100))
    assert float(z.compute().scale) == 1.0  # all-zero range -> scale 1 (params_from_range's rule)


def test_relu_zero_spike_does_not_shrink_the_clip():
    # half the values are exact zeros; they are left out of the histogram (see the module docstring)
    x = torch.relu(torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    obs = make_observer(QuantSpec(bits=8, signed=None, observer="kl"))
    obs.update(x)
    obs.compute()
    nz = x[x > 0].numpy()
    peak = float(x.max())
    hist = np.histogram(nz, bins=2048, range=(0, peak))[0]
    assert float(obs.clip) == pytest.approx(kl_threshold_bins(hist, 256) * peak / 2048, rel=1e-6)
    assert float(obs.clip) > 0.7 * peak


def test_discrete_data_does_not_collapse():
    # 17 distinct magnitudes (like sklearn-digits pixels): below bin 128 a near-empty P makes KL exactly 0
    rng = np.random.default_rng(0)
    levels = np.linspace(0.02, 1.85, 17)
    x = torch.from_numpy(rng.choice(levels, 20_000) * rng.choice([-1.0, 1.0], 20_000)).float()
    obs = make_observer(QuantSpec(bits=4, observer="kl"))
    obs.update(x)
    obs.compute()
    assert float(obs.clip) >= 1.85 / 16
    hist = np.histogram(x.abs().numpy(), bins=2048, range=(0, float(x.abs().max())))[0]
    assert kl_threshold_bins(hist, 8, start_bin=1) < 128  # the degenerate choice the default avoids

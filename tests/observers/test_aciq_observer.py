"""ACIQ: analytic clip ratios against Banner et al.'s table, and the observer's fit."""

import numpy as np
import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.observers import aciq_clip_ratio, make_observer
from hwquant.spec import QuantSpec

LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89}
GAUSS = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92}


@pytest.mark.parametrize("bits", sorted(LAPLACE))
def test_ratios_match_banner_table(bits):
    assert aciq_clip_ratio(bits, "laplace") == pytest.approx(LAPLACE[bits], rel=0.02)
    assert aciq_clip_ratio(bits, "gauss") == pytest.approx(GAUSS[bits], rel=0.02)
    # one-sided b bits == two-sided b+1 bits
    assert aciq_clip_ratio(bits, "laplace", signed=False) == aciq_clip_ratio(bits + 1, "laplace")


def test_ratio_is_the_argmin_of_the_expected_error():
    # Laplace(0, 1), M bits: E(a) = 2 exp(-a) + a^2 / (3 4^M); Gaussian: 2[(a^2+1) Q(a) - a phi(a)] + a^2/(3 4^M)
    from scipy import stats

    a = np.linspace(0.5, 15, 200_001)
    for m in (3, 6, 10):
        lap = 2 * np.exp(-a) + a**2 / (3 * 4.0**m)
        gau = 2 * ((a**2 + 1) * stats.norm.sf(a) - a * stats.norm.pdf(a)) + a**2 / (3 * 4.0**m)
        assert aciq_clip_ratio(m, "laplace") == pytest.approx(a[np.argmin(lap)], abs=1e-4)
        assert aciq_clip_ratio(m, "gauss") == pytest.approx(a[np.argmin(gau)], abs=1e-4)


def test_observer_clip_from_fit():
    rng = np.random.default_rng(0)
    x = rng.laplace(scale=0.7, size=200_000).astype(np.float32)
    obs = make_observer(QuantSpec(bits=4, observer="aciq"))
    obs.update(torch.from_numpy(x))
    obs.compute()
    b = np.abs(x.astype(np.float64)).mean()
    assert float(obs.clip) == pytest.approx(aciq_clip_ratio(4, "laplace") * b, rel=1e-5)
    g = make_observer(QuantSpec(bits=4, observer="aciq", observer_args={"dist": "gauss"}))
    g.update(torch.from_numpy(x))
    g.compute()
    assert float(g.clip) == pytest.approx(aciq_clip_ratio(4, "gauss") * np.sqrt((x.astype(np.float64) ** 2).mean()),
                                          rel=1e-5)
    # one-sided: fit to the positive part, zeros left out; one-sided ratio
    r = np.maximum(x, 0)
    u = make_observer(QuantSpec(bits=4, signed=None, observer="aciq"))
    u.update(torch.from_numpy(r))
    params = u.compute()
    assert not params.signed
    assert float(u.clip) == pytest.approx(aciq_clip_ratio(4, "laplace", False) * r[r > 0].mean(), rel=1e-5)
    # 8-bit clip beyond the data is capped at the observed peak
    small = make_observer(QuantSpec(bits=8, observer="aciq"))
    small.update(torch.tensor([-1.0, 1.0, 0.5, -0.5]))
    small.compute()
    assert float(small.clip) == 1.0


def test_bad_dist():
    with pytest.raises(ConfigError):
        make_observer(QuantSpec(observer="aciq", observer_args={"dist": "cauchy"}))
    with pytest.raises(ConfigError):
        aciq_clip_ratio(4, "cauchy")

"""Generalized gamma distribution (GGD) of activation magnitudes, its fit, and its optimal uniform step.

**Density.**  Magnitudes ``x = |v| > 0`` follow the generalized gamma density::

    g(x) = alpha * lam^a / Gamma(a) * x^beta * exp(-lam * x^alpha),     a = (beta + 1) / alpha,
    alpha > 0, beta > -1, lam > 0.

It is scipy's ``gengamma(a, c, scale)`` with ``c = alpha``, ``a = (beta + 1) / alpha``,
``scale = lam^(-1/alpha)`` (so ``alpha = c``, ``beta = a*c - 1``, ``lam = scale^(-c)``).  ``alpha = 1``
is a gamma law (Laplace magnitudes for ``beta = 0``), ``alpha = 2, beta = 0`` half-normal magnitudes.
A :class:`GGD` also carries ``zero_mass`` (probability of an exact zero, e.g. after ReLU) and ``signed``
(two-sided: ``v = +-x`` with probability 1/2 each, density ``g(|v|)/2``; one-sided: ``v = x >= 0``)::

    P(v = 0) = zero_mass,      p(v) = (1 - zero_mass) * g(|v|) * (1/2 if signed else [v > 0])   (v != 0)

**Moments** (used everywhere below): with ``Y ~ gengamma(a, c, scale)``, ``Y^c / scale^c ~ Gamma(a, 1)``, so::

    E[Y^k]              = scale^k * Gamma(a + k/c) / Gamma(a)
    E[Y^k ; Y < t]      = E[Y^k] * P(a + k/c, (t / scale)^c)              P = regularized lower incomplete gamma

**Fit** (:func:`ggd_fit`): maximum likelihood on the non-zero magnitudes (a seeded random subsample of at most
``max_samples``), profiled down to one dimension.  For fixed ``alpha``, ``y = x^alpha`` is ``Gamma(a, rate lam)``,
whose MLE is ``lam = a / mean(y)`` and ``log a - digamma(a) = log mean(y) - mean(log y)`` (a 1-D equation with a
unique root, solved by Minka's Newton iteration).  The profile log-likelihood per sample::

    l(alpha) = log alpha + a log a - a - lgamma(a) - a*s(alpha) - mean(log x),
    s(alpha) = log mean(x^alpha) - alpha * mean(log x)

is maximised over ``log alpha`` by a coarse grid followed by a bounded Brent search.  This is the exact joint
MLE (three parameters), one to two orders of magnitude faster than ``scipy.stats.gengamma.fit`` (a generic
optimiser over three coupled parameters) and at least as good a likelihood.  ``method="moments"`` matches the
variance and skewness of ``log x`` instead (``var log y = trigamma(a)``,
``skew log y = polygamma(2, a) / trigamma(a)^1.5``).

**Expected error** (:func:`expected_mse`) of the mid-tread uniform quantizer ``q(v) = step * clamp(round(v /
step), q_min, q_max)`` under the density, exactly: on each side, the cells ``[(k - 1/2) step, (k + 1/2) step)``
map to ``k * step`` and the overload cell ``[(K - 1/2) step, inf)`` to ``K * step``; each contributes
``E[Y^2; cell] - 2 q E[Y; cell] + q^2 P(cell)`` from the closed-form partial moments.  Zeros quantize to 0
exactly, so the error is ``(1 - zero_mass)`` times that of the continuous part.

**Optimal step** (:func:`ggd_optimal_step`): start from the asymptotic optimum of Hui & Neuhoff (2001) for
``N = 2^bits`` levels::

    step_0 = (2 / N) * (2 ln N / lam)^(1 / alpha)        (two-sided codes; one-sided: 1 / N instead of 2 / N)

then minimise :func:`expected_mse` over the step: a log-spaced grid over ``[step_0 / 16, 8 step_0]`` (shifted
while the minimum sits on its edge) and a bounded Brent search between the best grid point's neighbours.  One
:func:`expected_mse` costs O(2^bits) incomplete-gamma evaluations, so the search takes ~15 ms at 8 bits,
~0.1 s at 12 bits and ~1.5 s at 16 bits.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .codes import check_bits
from .uniform import fake_quantize

FIT_METHODS = ("mle", "moments")


def lazy_scipy(name: str):
    """``scipy.<name>``, imported on first use (keeps ``import hwquant`` free of scipy's ~0.5 s import)."""
    return importlib.import_module(f"scipy.{name}")

# Search interval of log(alpha) for the fit: alpha in [0.02, 50] covers everything from extremely heavy
# tails (alpha -> 0) to nearly constant magnitudes (alpha -> inf).
_LOG_ALPHA_LO, _LOG_ALPHA_HI = math.log(0.02), math.log(50.0)


@dataclass(frozen=True)
class GGD:
    """A fitted generalized gamma distribution of magnitudes (see the module docstring).

    Attributes:
        alpha: tail exponent ``alpha > 0`` (1: Laplace-like, 2: Gaussian-like, < 1: heavy).
        beta: power of ``x`` near zero, ``beta > -1``.
        lam: rate ``lam > 0`` in ``exp(-lam x^alpha)``.
        zero_mass: probability of an exact zero, ``0 <= zero_mass < 1``.
        signed: two-sided symmetric (``True``) or non-negative (``False``) values.
    """

    alpha: float
    beta: float
    lam: float
    zero_mass: float = 0.0
    signed: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "lam", "zero_mass"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(f"GGD {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.alpha <= 0:
            raise ConfigError(f"GGD alpha must be > 0, got {self.alpha}")
        if self.beta <= -1:
            raise ConfigError(f"GGD beta must be > -1, got {self.beta}")
        if self.lam <= 0:
            raise ConfigError(f"GGD lam must be > 0, got {self.lam}")
        if not 0.0 <= self.zero_mass < 1.0:
            raise ConfigError(f"GGD zero_mass must be in [0, 1), got {self.zero_mass}")
        object.__setattr__(self, "signed", bool(self.signed))

    # scipy parametrisation -------------------------------------------------------------------------------
    @property
    def a(self) -> float:
        """scipy's shape ``a = (beta + 1) / alpha``."""
        return (self.beta + 1.0) / self.alpha

    @property
    def c(self) -> float:
        """scipy's shape ``c = alpha``."""
        return self.alpha

    @property
    def scale(self) -> float:
        """scipy's ``scale = lam^(-1/alpha)``."""
        return math.exp(-math.log(self.lam) / self.alpha)

    @classmethod
    def from_scipy(cls, a: float, c: float, scale: float = 1.0, zero_mass: float = 0.0, signed: bool = False) -> GGD:
        """The GGD of ``scipy.stats.gengamma(a, c, scale=scale)`` magnitudes: ``alpha=c, beta=a*c-1, lam=scale^-c``."""
        return cls(alpha=c, beta=a * c - 1.0, lam=math.exp(-c * math.log(scale)), zero_mass=zero_mass, signed=signed)

    def to_scipy(self):
        """Frozen ``scipy.stats.gengamma`` of the non-zero magnitudes (the continuous part, ``loc = 0``)."""
        stats = lazy_scipy("stats")
        return stats.gengamma(self.a, self.c, scale=self.scale)

    # densities and moments -------------------------------------------------------------------------------
    def pdf(self, x: np.ndarray | float) -> np.ndarray:
        """Density of the continuous part at ``x`` (signed values): ``(1 - zero_mass) g(|x|) (1/2 | [x > 0])``.

        The point mass ``zero_mass`` at 0 is not included (it has no density).
        """
        x = np.asarray(x, dtype=np.float64)
        g = self.to_scipy().pdf(np.abs(x))
        if self.signed:
            g = g / 2.0
        else:
            g = np.where(x > 0, g, 0.0)
        return (1.0 - self.zero_mass) * g

    def log_likelihood(self, magnitudes: np.ndarray) -> float:
        """Mean ``log g(x)`` over the given non-zero magnitudes (the quantity the MLE fit maximises)."""
        special = lazy_scipy("special")
        x = np.abs(np.asarray(magnitudes, dtype=np.float64).ravel())
        x = x[x > 0]
        if x.size == 0:
            raise DataError("log-likelihood needs at least one non-zero magnitude")
        lx = np.log(x)
        a, al = self.a, self.alpha
        ll = math.log(al) + a * math.log(self.lam) - special.gammaln(a) + self.beta * lx - self.lam * np.exp(al * lx)
        return float(np.mean(ll))

    def magnitude_moment(self, k: float) -> float:
        """``E[Y^k]`` of the continuous magnitude ``Y``: ``scale^k Gamma(a + k/c) / Gamma(a)`` (``k > -beta-1``)."""
        special = lazy_scipy("special")
        a, c = self.a, self.c
        return math.exp(k * math.log(self.scale) + special.gammaln(a + k / c) - special.gammaln(a))

    def moment_abs(self, k: float) -> float:
        """``E|v|^k`` including the zeros: ``(1 - zero_mass) E[Y^k]`` (for ``k > 0``)."""
        return (1.0 - self.zero_mass) * self.magnitude_moment(k)

    def mean_abs(self) -> float:
        """``E|v| = (1 - zero_mass) scale Gamma(a + 1/c) / Gamma(a)``."""
        return self.moment_abs(1.0)

    def mean_square(self) -> float:
        """``E[v^2] = (1 - zero_mass) scale^2 Gamma(a + 2/c) / Gamma(a)`` (the signal power)."""
        return self.moment_abs(2.0)

    def partial_moments(self, k: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(E[Y^k; Y < t], E[Y^k; Y >= t])`` of the continuous magnitude ``Y``, without cancellation.

        ``E[Y^k; Y < t] = E[Y^k] P(a + k/c, (t/scale)^c)``; the smaller of ``P`` and ``Q = 1 - P`` is computed
        directly (``gammainc`` below the median region, ``gammaincc`` above) and the other as its complement.
        """
        special = lazy_scipy("special")
        t = np.asarray(t, dtype=np.float64)
        s = self.a + k / self.c
        with np.errstate(divide="ignore"):
            z = np.exp(self.c * (np.log(t) - math.log(self.scale)))
        low = z < s  # P(s, z) < ~0.5 roughly below the mean of Gamma(s)
        p = np.empty_like(z)
        q = np.empty_like(z)
        p[low] = special.gammainc(s, z[low])
        q[low] = 1.0 - p[low]
        q[~low] = special.gammaincc(s, z[~low])
        p[~low] = 1.0 - q[~low]
        m = self.magnitude_moment(k)
        return m * p, m * q

    def sample(self, n: int, seed: int | np.random.Generator | None = 0) -> np.ndarray:
        """``n`` values drawn from the full distribution (zeros, magnitudes, random signs if ``signed``)."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        y = self.to_scipy().rvs(size=n, random_state=rng)
        if self.zero_mass > 0:
            y = np.where(rng.random(n) < self.zero_mass, 0.0, y)
        if self.signed:
            y = np.where(rng.random(n) < 0.5, -y, y)
        return y


# --------------------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------------------


def _as_numpy(samples) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        arr = samples.detach().cpu().to(torch.float64).numpy().ravel()
    else:
        try:
            arr = np.asarray(samples, dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            raise DataError(f"GGD fit needs numeric samples: {e}") from None
    if arr.size == 0:
        raise DataError("cannot fit a GGD to an empty sample")
    if not np.isfinite(arr).all():
        raise DataError("non-finite value (NaN or inf) in the samples of a GGD fit")
    return arr


def gamma_shape_mle(s: float | np.ndarray) -> float | np.ndarray:
    """Root ``a`` of ``log a - digamma(a) = s`` (``s > 0``): the gamma shape MLE for ``s = log mean y - mean log y``.

    Minka's (2002) closed-form start ``a0 = (3 - s + sqrt((s - 3)^2 + 24 s)) / (12 s)`` refined by his generalised
    Newton step ``1/a <- 1/a + (log a - digamma(a) - s) / (a^2 (1/a - trigamma(a)))`` (converges in ~4 steps).
    """
    special = lazy_scipy("special")
    s = np.maximum(np.asarray(s, dtype=np.float64), 1e-300)
    a = (3.0 - s + np.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
    for _ in range(8):
        num = np.log(a) - special.digamma(a) - s
        den = a * a * (1.0 / a - special.polygamma(1, a))
        a_new = 1.0 / (1.0 / a + num / den)
        a_new = np.where(np.isfinite(a_new) & (a_new > 0), a_new, a)
        done = np.all(np.abs(a_new - a) <= 1e-13 * a)
        a = a_new
        if done:
            break
    return float(a) if a.ndim == 0 else a


def _profile(u: np.ndarray, log_alpha: float) -> tuple[float, float, float]:
    """``(l(alpha) + mean log x, a, s)`` for centred logs ``u = log x - mean(log x)`` (see module docstring)."""
    special = lazy_scipy("special")
    al = math.exp(log_alpha)
    z = al * u
    zmax = float(z.max())
    s = zmax + math.log(float(np.mean(np.exp(z - zmax))))  # log mean(x^alpha) - alpha mean(log x) >= 0
    a = gamma_shape_mle(s)
    ll = log_alpha + a * math.log(a) - a - float(special.gammaln(a)) - a * s
    return ll, a, s


def _fit_mle(lx: np.ndarray) -> tuple[float, float, float]:
    """MLE ``(alpha, a, log lam)`` from the logs of the magnitudes."""
    optimize = lazy_scipy("optimize")
    mean_lx = float(lx.mean())
    u = lx - mean_lx
    grid = np.linspace(_LOG_ALPHA_LO, _LOG_ALPHA_HI, 33)
    vals = [_profile(u, t)[0] for t in grid]
    i = int(np.argmax(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(lambda t: -_profile(u, t)[0], bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-7})
    t = float(res.x) if -res.fun >= vals[i] else float(grid[i])
    _, a, s = _profile(u, t)
    al = math.exp(t)
    log_lam = math.log(a) - al * mean_lx - s  # lam = a / mean(x^alpha)
    return al, a, log_lam


def _fit_moments(lx: np.ndarray) -> tuple[float, float, float]:
    """Method of moments on ``log x``: skewness gives ``a``, variance ``alpha``, mean ``lam``."""
    optimize = lazy_scipy("optimize")
    special = lazy_scipy("special")
    stats = lazy_scipy("stats")
    mean_lx = float(lx.mean())
    var = float(lx.var())
    skew = float(stats.skew(lx))

    def f(log_a: float) -> float:
        a = math.exp(log_a)
        return float(special.polygamma(2, a) / special.polygamma(1, a) ** 1.5) - skew

    lo, hi = math.log(1e-3), math.log(1e5)
    if f(lo) >= 0:  # skewness <= -2 (the limit a -> 0)
        log_a = lo
    elif f(hi) <= 0:  # skewness >= 0: nearly log-symmetric, a -> inf
        log_a = hi
    else:
        log_a = optimize.brentq(f, lo, hi, xtol=1e-12)
    a = math.exp(log_a)
    al = math.sqrt(float(special.polygamma(1, a)) / var)
    log_lam = float(special.digamma(a)) - al * mean_lx  # E log y = digamma(a) - log lam, y = x^alpha
    return al, a, log_lam


def ggd_fit(
    samples,
    *,
    signed: bool | None = None,
    max_samples: int | None = 100_000,
    seed: int = 0,
    method: str = "mle",
) -> GGD:
    """Fit a :class:`GGD` to ``samples`` (tensor or array, any shape).

    ``zero_mass`` is the exact fraction of zeros over all samples; the density is fitted to the non-zero
    magnitudes ``|v|``, of which a random subsample of ``max_samples`` (``numpy.random.default_rng(seed)``,
    without replacement; ``None``: all) is used.  ``signed=None`` makes the distribution two-sided when any
    sample is negative.  ``method="mle"`` (default) is the exact maximum-likelihood fit, ``"moments"`` the
    log-moment fit (see the module docstring).  Cost on 2 cores: ~0.02-0.05 s for 10^6 samples with the default
    subsample, ~0.25 s with ``max_samples=None``.

    Raises :class:`DataError` for empty input, NaN/inf, no non-zero sample, or a single repeated magnitude.
    """
    if method not in FIT_METHODS:
        raise ConfigError(f"GGD fit method must be one of {', '.join(FIT_METHODS)}, got {method!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 2):
        raise ConfigError(f"max_samples must be an integer >= 2 or None, got {max_samples!r}")
    arr = _as_numpy(samples)
    if signed is None:
        signed = bool((arr < 0).any())
    nz = np.abs(arr[arr != 0])
    if nz.size == 0:
        raise DataError("cannot fit a GGD: every sample is zero")
    zero_mass = 1.0 - nz.size / arr.size
    if max_samples is not None and nz.size > max_samples:
        nz = nz[np.random.default_rng(seed).choice(nz.size, size=max_samples, replace=False)]
    lx = np.log(nz)
    if float(lx.max() - lx.min()) == 0.0:
        raise DataError("cannot fit a GGD: all non-zero magnitudes are equal")
    al, a, log_lam = _fit_mle(lx) if method == "mle" else _fit_moments(lx)
    if not -700.0 < log_lam < 700.0:
        raise DataError(f"cannot fit a GGD: rate lam = exp({log_lam:.0f}) is out of float range (rescale the data)")
    return GGD(alpha=al, beta=a * al - 1.0, lam=math.exp(log_lam), zero_mass=zero_mass, signed=bool(signed))


# --------------------------------------------------------------------------------------------------------
# expected error and optimal step
# --------------------------------------------------------------------------------------------------------


def code_range(levels: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``levels`` integer codes: signed two's complement (narrow: symmetric, without the most
    negative code) or unsigned ``0 .. levels - 1``."""
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 2:
        raise ConfigError(f"levels must be an integer >= 2, got {levels!r}")
    levels = int(levels)
    if signed:
        qmin = -(levels // 2)
        qmax = levels - 1 + qmin
        if narrow:
            qmin = -qmax
        return qmin, qmax
    return 0, levels - 1


def _side_mse(ggd: GGD, step: float, k_max: int) -> float:
    """``E[(Y - q(Y))^2]`` for the magnitude ``Y`` and codes ``0..k_max`` on one side (no zero mass)."""
    if k_max <= 0:
        return ggd.magnitude_moment(2.0)
    edges = (np.arange(k_max, dtype=np.float64) + 0.5) * step  # t_0 .. t_{K-1}
    q = np.arange(k_max + 1, dtype=np.float64) * step  # reconstruction of cell k
    parts = []
    for k in (0, 1, 2):
        lower, upper = ggd.partial_moments(k, edges)
        # Mass in [t_{j-1}, t_j): difference of lower parts where they are small, of upper parts otherwise.
        m_tot = ggd.magnitude_moment(k)
        lo_l = np.concatenate(([0.0], lower))
        hi_l = np.concatenate((lower, [m_tot]))
        lo_u = np.concatenate(([m_tot], upper))
        hi_u = np.concatenate((upper, [0.0]))
        use_upper = lo_l > 0.5 * m_tot
        parts.append(np.where(use_upper, lo_u - hi_u, hi_l - lo_l))
    m0, m1, m2 = parts
    cell = m2 - 2.0 * q * m1 + q * q * m0
    return float(np.sum(np.maximum(cell, 0.0)))


def expected_mse(
    ggd: GGD, step: float, levels: int, signed: bool | None = None, *, narrow: bool = False
) -> float:
    """Expected ``E[(v - q(v))^2]`` of the uniform mid-tread quantizer under ``ggd``, clipping included.

    ``q(v) = step * clamp(round(v / step), q_min, q_max)`` with ``levels = N`` codes: signed
    ``-N/2 .. N/2 - 1`` (``narrow``: ``-(N/2 - 1) .. N/2 - 1``), unsigned ``0 .. N - 1``; ``signed=None``
    uses ``ggd.signed``.  For ``b`` bits pass ``levels = 2**b``.  Negative values of a two-sided ``ggd`` under an
    unsigned quantizer saturate at 0.  Exact (closed-form partial moments; see the module docstring).
    """
    if not (isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0):
        raise ConfigError(f"step must be a finite number > 0, got {step!r}")
    signed = ggd.signed if signed is None else bool(signed)
    qmin, qmax = code_range(levels, signed, narrow)
    pos = _side_mse(ggd, float(step), qmax)
    if ggd.signed:
        err = 0.5 * (pos + _side_mse(ggd, float(step), -qmin))
    else:
        err = pos
    return (1.0 - ggd.zero_mass) * err


def hui_neuhoff_step(ggd: GGD, bits: int, signed: bool | None = None) -> float:
    """Asymptotic optimal step ``(2/N) (2 ln N / lam)^(1/alpha)``, ``N = 2^bits`` (unsigned codes: ``1/N``).

    The support ``(2 ln N / lam)^(1/alpha)`` is where the tail density has fallen to about ``1/N^2``
    (Hui & Neuhoff 2001, for ``exp(-lam x^alpha)`` tails); it is split into ``N/2`` (signed) or ``N`` steps.
    """
    check_bits(bits, lo=1, hi=32)
    signed = ggd.signed if signed is None else bool(signed)
    n = 2.0**bits
    support = math.exp((math.log(2.0 * math.log(n)) - math.log(ggd.lam)) / ggd.alpha)
    return (2.0 / n if signed else 1.0 / n) * support


def ggd_optimal_step(
    ggd: GGD,
    bits: int,
    signed: bool | None = None,
    power_of_two: bool = False,
    calib=None,
    *,
    narrow: bool = False,
) -> float:
    """Step minimising :func:`expected_mse` of ``ggd`` with ``2^bits`` levels (signed codes if ``signed``).

    ``signed=None`` uses ``ggd.signed``.  Search: log-spaced grid of 29 steps over ``[step_0/16, 8 step_0]``
    around :func:`hui_neuhoff_step` (shifted while the best point is on the edge), then bounded Brent on
    ``log step`` between the best grid point's neighbours.

    ``power_of_two=True`` (fixed point): compare ``2^floor(log2 step)`` and ``2^ceil(log2 step)`` by the MSE of
    :func:`fake_quantize` on ``calib`` (tensor/array of calibration samples) if given, else by
    :func:`expected_mse`, and return the better (ties: the smaller step).
    """
    optimize = lazy_scipy("optimize")
    check_bits(bits, lo=1, hi=32)
    signed = ggd.signed if signed is None else bool(signed)
    levels = 2**bits

    def f(log_step: float) -> float:
        return expected_mse(ggd, math.exp(log_step), levels, signed, narrow=narrow)

    t0 = math.log(hui_neuhoff_step(ggd, bits, signed))
    lo, hi = t0 - math.log(16.0), t0 + math.log(8.0)
    for _ in range(20):
        grid = np.linspace(lo, hi, 29)
        vals = np.array([f(t) for t in grid])
        i = int(np.argmin(vals))
        if 0 < i < len(grid) - 1:
            break
        width = hi - lo
        lo, hi = (lo - width / 2, hi - width / 2) if i == 0 else (lo + width / 2, hi + width / 2)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": 1e-6})
    t = float(res.x) if res.fun <= vals[i] else float(grid[i])
    step = math.exp(t)
    if not power_of_two:
        return step
    return power_of_two_step(step, bits, signed, ggd=ggd, calib=calib, narrow=narrow)


def power_of_two_step(
    step: float, bits: int, signed: bool, *, ggd: GGD | None = None, calib=None, narrow: bool = False
) -> float:
    """The better of ``2^floor(log2 step)`` and ``2^ceil(log2 step)`` (``step`` itself if it is a power of two).

    "Better" is the smaller MSE of :func:`fake_quantize` (``bits``, ``signed``, ``narrow``) on ``calib`` when
    given, else the smaller :func:`expected_mse` under ``ggd``; ties keep the smaller step.
    """
    if not (math.isfinite(step) and step > 0):
        raise ConfigError(f"step must be a finite number > 0, got {step!r}")
    e = math.floor(math.log2(step))
    if 2.0**e == step:
        return step
    cands = [2.0**e, 2.0 ** (e + 1)]
    if calib is not None:
        x = calib if isinstance(calib, torch.Tensor) else torch.as_tensor(np.asarray(calib, dtype=np.float32))
        x = x.detach().float().reshape(-1)
        if x.numel() == 0 or not torch.isfinite(x).all():
            raise DataError("calibration samples for the power-of-two step must be non-empty and finite")
        errs = [float((fake_quantize(x, c, bits, signed, narrow=narrow).double() - x.double()).pow(2).mean())
                for c in cands]
    elif ggd is not None:
        errs = [expected_mse(ggd, c, 2**bits, signed, narrow=narrow) for c in cands]
    else:
        raise ConfigError("power_of_two_step needs calibration samples or a GGD to compare the candidates")
    return cands[int(np.argmin(errs))]  # argmin keeps the first (smaller step) on a tie


__all__ = [
    "FIT_METHODS",
    "GGD",
    "expected_mse",
    "gamma_shape_mle",
    "ggd_fit",
    "ggd_optimal_step",
    "hui_neuhoff_step",
    "power_of_two_step",
]

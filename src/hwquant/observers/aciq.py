"""ACIQ observer (Banner et al. 2019): the analytic clip that minimises expected MSE for a Laplace or Gaussian fit.

Two-sided values ``x`` on ``M`` bits, clip ``alpha``, ``2^M`` uniform bins over ``[-alpha, alpha]``: the expected
error is the clipping error plus the rounding error ``Delta^2 / 12 = alpha^2 / (3 * 4^M)``::

    Laplace(0, b):   E(alpha) = 2 b^2 exp(-alpha / b)                                     + alpha^2 / (3 * 4^M)
    Normal(0, s^2):  E(alpha) = 2 [(alpha^2 + s^2) Q(alpha / s) - alpha s phi(alpha / s)] + alpha^2 / (3 * 4^M)

(``Q = 1 - Phi``).  Setting ``dE/dalpha = 0`` with ``t = alpha / b`` (resp. ``alpha / s``)::

    Laplace:   t e^t = 3 * 4^M                  ->  t = W(3 * 4^M)          (Lambert W, closed form)
    Normal:    phi(t) - t Q(t) = t / (6 * 4^M)  ->  solved by Brent's method

which reproduces Banner's table (Laplace 2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89 b; Gaussian 1.71 .. 3.92 s for
M = 2..8) and works for any bit width.

Fits: ``b = mean|x|`` and ``s = sqrt(mean x^2)``, the maximum-likelihood estimates of a zero-centred Laplace /
Normal (the quantizer is centred at 0, so the spread around 0 is what matters).

One-sided (unsigned) data: the positive part is modelled as a half-Laplace (exponential, ``b = mean(x | x > 0)``)
or half-normal (``s = sqrt(mean(x^2 | x > 0))``); zeros (e.g. after ReLU) quantize exactly and are left out.
Its clipping error has the same form as the two-sided one, and ``2^b`` bins over ``[0, alpha]`` give rounding
error ``alpha^2 / (12 * 4^b) = alpha^2 / (3 * 4^(b+1))``, so the one-sided clip on ``b`` bits is the two-sided one
with ``M = b + 1``.  The clip is capped at the observed peak.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..numerics.codes import check_bits
from ..spec import QuantSpec
from .base import register_observer
from .sampling import DEFAULT_RESERVOIR, SamplingObserver, reject_unknown

ACIQ_DISTS = ("laplace", "gauss")


def aciq_clip_ratio(bits: int, dist: str = "laplace", signed: bool = True) -> float:
    """Optimal clip ``alpha / b`` (Laplace) or ``alpha / sigma`` (Gaussian) for ``bits`` (see the module docstring).

    >>> round(aciq_clip_ratio(8, "laplace"), 2), round(aciq_clip_ratio(4, "gauss"), 2)
    (9.89, 2.55)
    """
    from scipy import optimize, special, stats

    check_bits(bits, lo=1, hi=32)
    if dist not in ACIQ_DISTS:
        raise ConfigError(f"ACIQ dist must be one of {', '.join(ACIQ_DISTS)}, got {dist!r}")
    m = bits if signed else bits + 1
    k = 3.0 * 4.0**m
    if dist == "laplace":
        return float(special.lambertw(k).real)

    def g(t: float) -> float:
        return float(stats.norm.pdf(t) - t * stats.norm.sf(t)) - t / (2.0 * k)

    return float(optimize.brentq(g, 1e-6, 40.0, xtol=1e-14))


@register_observer("aciq")
class ACIQObserver(SamplingObserver):
    """Clip ``c = min(ratio * b_or_sigma, peak)`` per row, fitted on the reservoir sample.

    Arguments: ``dist`` (``"laplace"`` default, or ``"gauss"``), ``reservoir_size``, ``seed``.
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        *,
        dist: str = "laplace",
        reservoir_size: int = DEFAULT_RESERVOIR,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown("aciq", unknown)
        if dist not in ACIQ_DISTS:
            raise ConfigError(f"observer argument dist must be one of {', '.join(ACIQ_DISTS)}, got {dist!r}")
        self.dist = dist
        super().__init__(spec, axis, reservoir_size=reservoir_size, seed=seed)

    def spread(self, samples: torch.Tensor, signed: bool) -> torch.Tensor:
        """Per-row ``b`` (Laplace) or ``sigma`` (Gaussian), float64 ``[R]`` (see the module docstring)."""
        x = samples.double()
        if signed:
            w = torch.ones_like(x)
        else:
            w = (x > 0).double()
            x = x.clamp_min(0.0)
        n = w.sum(dim=1).clamp_min(1.0)
        if self.dist == "laplace":
            return (x.abs() * w).sum(dim=1) / n
        return torch.sqrt((x * x * w).sum(dim=1) / n)

    def clip_values(self, samples: torch.Tensor, signed: bool) -> torch.Tensor:
        ratio = aciq_clip_ratio(self.spec.bits, self.dist, signed)
        clip = torch.minimum(self.spread(samples, signed) * ratio, self.peak(signed).double())
        return clip.float()


__all__ = ["ACIQ_DISTS", "ACIQObserver", "aciq_clip_ratio"]

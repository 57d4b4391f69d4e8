"""Percentile observer: clip at a high percentile of the observed values instead of their maximum."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..spec import QuantParams, QuantSpec
from .base import params_from_range, register_observer
from .sampling import DEFAULT_RESERVOIR, SamplingObserver, reject_unknown


def percentile_rows(v: torch.Tensor, p: float) -> torch.Tensor:
    """``p``-th percentile (``0 <= p <= 100``) of each row of ``v`` ``[R, m]``, float64 ``[R]``.

    Linear interpolation between order statistics, ``numpy.percentile``'s default: with ``h = (m - 1) p / 100``,
    ``v_(floor h) + (h - floor h) (v_(floor h + 1) - v_(floor h))`` on the sorted row.
    """
    v = torch.sort(v.double(), dim=1).values
    m = v.shape[1]
    h = (m - 1) * (p / 100.0)
    lo = min(int(math.floor(h)), m - 1)
    hi = min(lo + 1, m - 1)
    t = h - lo
    a, b = v[:, lo], v[:, hi]
    # numpy's _lerp: a + (b - a) t, evaluated from the nearer end for accuracy
    return torch.where(torch.tensor(t >= 0.5), b - (b - a) * (1.0 - t), a + (b - a) * t)


@register_observer("percentile")
class PercentileObserver(SamplingObserver):
    """Clip ``c`` = the ``percentile``-th percentile of ``|x|`` (signed) or of ``x`` (unsigned), per row.

    Symmetric specs: range ``[-c, c]`` / ``[0, c]``, ``scale = c / q_max``.  Affine specs: the range is
    ``[P_(100-p)(x), P_p(x)]`` (both tails).  Percentiles are taken on the reservoir sample (exact while
    everything seen fits in it).  Arguments: ``percentile`` (default 99.99), ``reservoir_size``, ``seed``.
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        *,
        percentile: float = 99.99,
        reservoir_size: int = DEFAULT_RESERVOIR,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown("percentile", unknown)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ConfigError(f"observer argument percentile must be a number in (0, 100], got {percentile!r}")
        super().__init__(spec, axis, reservoir_size=reservoir_size, seed=seed)
        self.percentile = float(percentile)

    def clip_values(self, samples: torch.Tensor, signed: bool) -> torch.Tensor:
        v = samples.abs() if signed else samples
        return percentile_rows(v, self.percentile).clamp_min(0.0).float()

    def _compute(self) -> QuantParams:
        signed = self.resolved_signed()
        if self.spec.symmetric:
            return super()._compute()
        s = self.samples()
        lo = percentile_rows(s, 100.0 - self.percentile).float()
        hi = percentile_rows(s, self.percentile).float()
        return params_from_range(self._shape(lo), self._shape(hi), self.spec, signed, self.axis)

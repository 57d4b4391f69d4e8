"""MSE observer: the clip value whose quantizer has the smallest mean squared error on the observed data."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..numerics.uniform import fake_quantize
from ..spec import QuantSpec
from .base import register_observer
from .sampling import DEFAULT_RESERVOIR, SamplingObserver, check_int_arg, reject_unknown


@register_observer("mse")
class MSEObserver(SamplingObserver):
    """Grid search of the clip ``c`` minimising ``mean((x - Q_c(x))^2)`` over the reservoir sample, per row.

    Candidates: ``c_k = f_k * peak`` for ``grid`` fractions ``f_k`` evenly spaced in ``[min_frac, 1]``, where
    ``peak`` is the exact running ``max|x|`` (signed) or ``max x`` (unsigned).  ``Q_c`` is the spec's own
    quantizer for that clip (bits, sign, rounding, narrow, and for affine specs the zero point), i.e. exactly
    what :meth:`params_from_clip` would install; ties keep the smaller clip.  Arguments: ``grid`` (100),
    ``min_frac`` (0.2), ``reservoir_size``, ``seed``.
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        *,
        grid: int = 100,
        min_frac: float = 0.2,
        reservoir_size: int = DEFAULT_RESERVOIR,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown("mse", unknown)
        self.grid = check_int_arg("grid", grid, 1)
        if isinstance(min_frac, bool) or not isinstance(min_frac, (int, float)) or not 0 < min_frac <= 1:
            raise ConfigError(f"observer argument min_frac must be a number in (0, 1], got {min_frac!r}")
        self.min_frac = float(min_frac)
        super().__init__(spec, axis, reservoir_size=reservoir_size, seed=seed)
        self.seed = seed

    def fractions(self) -> torch.Tensor:
        """The candidate fractions of the peak, float64 ``[grid]`` (a single 1.0 for ``grid == 1``)."""
        if self.grid == 1:
            return torch.ones(1, dtype=torch.float64)
        return torch.linspace(self.min_frac, 1.0, self.grid, dtype=torch.float64)

    def errors(self, samples: torch.Tensor, clip: torch.Tensor, signed: bool) -> torch.Tensor:
        """Per-row MSE ``[R]`` (float64) of the quantizer installed for clip ``clip`` ``[R]``."""
        p = self.params_from_clip(clip, signed)
        gen = torch.Generator().manual_seed(self.seed) if self.spec.rounding == "stochastic" else None
        x_hat = fake_quantize(
            samples, p.scale.reshape(-1), self.spec.bits, signed, self.spec.rounding,
            zero_point=p.zero_point.reshape(-1), axis=0, narrow=self.spec.narrow, generator=gen,
        )
        return (samples.double() - x_hat.double()).pow(2).mean(dim=1)

    def clip_values(self, samples: torch.Tensor, signed: bool) -> torch.Tensor:
        peak = self.peak(signed).double()
        best_c = peak.clone()
        best_e = torch.full_like(peak, math.inf)
        for f in self.fractions().tolist():
            c = (peak * f).float()
            e = self.errors(samples, c, signed)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_c = torch.where(better, c.double(), best_c)
        self.best_mse = best_e
        return best_c.float()

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

    With ``spec.pow2`` (symmetric specs) and ``pow2_search`` (default) the candidates are the power-of-two
    steps instead: every
    ``s = 2^k`` from the largest power of two at or below ``min_frac * peak / Q`` to the smallest at or
    above ``peak / Q`` (clip ``c = s * Q``, ``Q = spec.clip_levels``), so the step is the MSE-best power of
    two rather than the best free step rounded in the log domain (which can be the worse neighbour: the
    error is not symmetric in ``log s`` - clipping grows faster than rounding noise).  ``pow2_search=False``
    keeps the free grid, and the quantizer then rounds the chosen step in the log domain.
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        *,
        grid: int = 100,
        min_frac: float = 0.2,
        pow2_search: bool = True,
        reservoir_size: int = DEFAULT_RESERVOIR,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown("mse", unknown)
        self.grid = check_int_arg("grid", grid, 1)
        if isinstance(min_frac, bool) or not isinstance(min_frac, (int, float)) or not 0 < min_frac <= 1:
            raise ConfigError(f"observer argument min_frac must be a number in (0, 1], got {min_frac!r}")
        self.min_frac = float(min_frac)
        if not isinstance(pow2_search, bool):
            raise ConfigError(f"observer argument pow2_search must be true or false, got {pow2_search!r}")
        self.pow2_search = pow2_search
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

    def candidates(self, peak: torch.Tensor, signed: bool) -> list[torch.Tensor]:
        """Candidate clips, each ``[R]`` float32: fractions of the peak, or power-of-two steps (``pow2``)."""
        if not (self.spec.pow2 and self.spec.symmetric and self.pow2_search):
            return [(peak * f).float() for f in self.fractions().tolist()]
        q = float(self.spec.clip_levels(signed))
        pos = peak > 0
        safe = torch.where(pos, peak, torch.ones_like(peak))
        k_lo = torch.floor(torch.log2(safe * self.min_frac / q))
        k_hi = torch.ceil(torch.log2(safe / q))
        n = int((k_hi - k_lo).max().item()) + 1 if peak.numel() else 0
        out = []
        for j in range(n):
            k = torch.minimum(k_lo + j, k_hi)  # rows with a narrower range repeat their last candidate
            out.append(torch.where(pos, torch.exp2(k) * q, peak).float())
        return out

    def clip_values(self, samples: torch.Tensor, signed: bool) -> torch.Tensor:
        peak = self.peak(signed).double()
        best_c = peak.clone()
        best_e = torch.full_like(peak, math.inf)
        for c in self.candidates(peak, signed):
            e = self.errors(samples, c, signed)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_c = torch.where(better, c.double(), best_c)
        self.best_mse = best_e
        return best_c.float()

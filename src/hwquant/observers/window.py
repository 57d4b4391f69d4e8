"""Window observer: the 8-bit step from the observed range and the shift of the bit window with the least MSE.

For a spec with ``clip_at="window"`` (see :mod:`hwquant.numerics.window`): the ``base_bits``-wide quantizer
takes the min-max step ``d8 = peak / Q(base_bits)`` (per tensor, or per channel for weights), and one shift
``s in 0..base_bits - bits`` for the whole tensor (one shifter setting per layer) is the one whose two-stage
codes have the smallest mean squared error on the reservoir sample (ties keep the smaller shift).  The
installed scale is the effective step ``2^s * d8``; ``shift`` and the error of every shift are kept for reports.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..numerics.window import window_mse
from ..spec import QuantParams, QuantSpec
from .base import register_observer
from .sampling import DEFAULT_RESERVOIR, SamplingObserver, reject_unknown


@register_observer("window")
class WindowObserver(SamplingObserver):
    """Min-max ``base_bits`` step and the MSE-best window shift (see the module docstring).

    Arguments: ``reservoir_size``, ``seed``.
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, *, reservoir_size: int = DEFAULT_RESERVOIR,
                 seed: int = 0, **unknown) -> None:
        reject_unknown("window", unknown)
        if spec.clip_at != "window":
            raise ConfigError(f"observer 'window' needs clip_at='window', got clip_at={spec.clip_at!r}")
        super().__init__(spec, axis, reservoir_size=reservoir_size, seed=seed)
        self.shift: int | None = None
        self.mse_by_shift: list[float] = []

    def _compute(self) -> QuantParams:
        signed = self.resolved_signed()
        peak = self.peak(signed)
        samples = self.samples()  # [R, m]: one row per tensor or per channel
        mse = window_mse(samples, peak, self.spec.bits, self.spec.q_step_bits, signed,
                         axis=None if self.axis is None else 0)
        self.mse_by_shift = [float(e) for e in mse]
        self.shift = int(torch.argmin(mse))  # argmin returns the first (smallest) shift on ties
        self.clip = peak.float()
        p = self.params_from_clip(self.clip, signed)  # scale = peak / Q(base_bits): the 8-bit step
        p.scale = p.scale * 2.0 ** self.shift
        return p

    def summary(self) -> dict:
        out = super().summary()
        if self.shift is not None:
            out["window_shift"] = self.shift
            out["mse_by_shift"] = self.mse_by_shift
        return out

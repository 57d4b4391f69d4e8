"""Fixed-point observer: Qm.n step ``2^-FL`` with the error-minimising fractional length FL.

For weights (one update with the whole tensor) this is the GGD-PTQ paper's weight rule; on activations it
searches FL over the reservoir-free exact data of every update concatenated (use it only on small tensors).
"""

from __future__ import annotations

import torch

from ..numerics.fixed_point import best_fraction_length, best_fraction_length_per_channel
from ..spec import QuantParams, QuantSpec
from .base import Observer, register_observer


@register_observer("fixedpoint")
class FixedPointObserver(Observer):
    """Per tensor or per channel: ``scale = 2^-FL``, FL minimising the saturating quantizer's MSE within
    ``radius`` of ``b - 1 - ceil(log2 max|x|)``."""

    def __init__(self, spec: QuantSpec, axis: int | None = None, radius: int = 3) -> None:
        super().__init__(spec, axis)
        self.radius = radius
        self.chunks: list[torch.Tensor] = []
        self.fl: torch.Tensor | int | None = None

    def reset(self) -> None:
        super().reset()
        self.chunks = []

    def _update(self, x: torch.Tensor) -> None:
        self.chunks.append(x.detach().float().clone())

    def _compute(self) -> QuantParams:
        signed = self.resolved_signed()
        if self.axis is None:
            x = torch.cat([c.reshape(-1) for c in self.chunks])
            fl = best_fraction_length(x, self.spec.bits, signed=signed, radius=self.radius, rounding=self.spec.rounding)
            self.fl = fl
            scale = torch.tensor(2.0**-fl, dtype=torch.float32)
        else:
            ax = self.axis % self.chunks[0].dim()
            x = torch.cat([c.movedim(ax, 0).reshape(c.shape[ax], -1) for c in self.chunks], dim=1)
            fl = best_fraction_length_per_channel(x, self.spec.bits, axis=0, signed=signed,
                                                  radius=self.radius, rounding=self.spec.rounding)
            self.fl = fl
            scale = torch.pow(2.0, -fl.double()).float()
        zp = torch.zeros_like(scale, dtype=torch.int32)
        return QuantParams(scale=scale, zero_point=zp, bits=self.spec.bits, signed=signed, axis=self.axis,
                           narrow=self.spec.narrow)

    def summary(self) -> dict:
        out = super().summary()
        if isinstance(self.fl, int):
            out["fl"] = self.fl
        return out

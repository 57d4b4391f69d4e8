"""Min-max observer: the range is the running minimum and maximum of everything seen."""

from __future__ import annotations

import torch

from ..spec import QuantParams, QuantSpec
from .base import Observer, params_from_range, register_observer


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Range ``[min x, max x]`` over all updates (per tensor, or per channel along ``axis``)."""

    def __init__(self, spec: QuantSpec, axis: int | None = None) -> None:
        super().__init__(spec, axis)
        self.max_seen: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.max_seen = None

    def _update(self, x: torch.Tensor) -> None:
        hi = self._reduce(x, torch.amax)
        self.max_seen = hi if self.max_seen is None else torch.maximum(self.max_seen, hi)

    def _compute(self) -> QuantParams:
        return params_from_range(self.min_seen, self.max_seen, self.spec, self.resolved_signed(), self.axis)

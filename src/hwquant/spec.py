"""What to quantize and how: small frozen dataclasses composed by every method.

``QuantSpec`` says how one tensor is quantized (bits, sign, granularity, rounding, observer);
``QuantParams`` is what calibration produced for it (scale, zero point, code range).  Methods build
specs; observers turn data into params; layers call :mod:`hwquant.numerics` with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from .errors import ConfigError
from .numerics.rounding import ROUNDING_MODES
from .numerics.uniform import MAX_BITS, MIN_BITS, qrange

GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Attributes:
        bits: code width, ``2..16``.
        signed: two's complement codes; ``None`` decides at calibration (unsigned if the observed
            minimum is ``>= 0``, e.g. after ReLU).
        granularity: ``"tensor"`` (one scale) or ``"channel"`` (one scale per output channel, axis 0).
        rounding: ``nearest`` (half to even), ``zero``, ``floor`` or ``stochastic``.
        observer: name of the calibration observer (see :mod:`hwquant.observers`).
        symmetric: zero point fixed at 0 (hardware-friendly); ``False`` fits an affine zero point.
        narrow: signed range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (symmetric around 0).
        observer_args: extra keyword arguments for the observer (e.g. ``{"percentile": 99.99}``).
    """

    bits: int = 8
    signed: bool | None = True
    granularity: Literal["tensor", "channel"] = "tensor"
    rounding: str = "nearest"
    observer: str = "minmax"
    symmetric: bool = True
    narrow: bool = False
    observer_args: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.signed not in (True, False, None):
            raise ConfigError(f"signed must be true, false or null (auto), got {self.signed!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.rounding not in ROUNDING_MODES:
            raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {self.rounding!r}")
        if isinstance(self.observer_args, dict):
            object.__setattr__(self, "observer_args", tuple(sorted(self.observer_args.items())))

    def with_(self, **changes) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass
class QuantParams:
    """Calibrated parameters of one quantized tensor.

    ``scale`` and ``zero_point`` are 0-d tensors (per tensor) or 1-d of length ``C`` (per channel along
    ``axis``).  Codes lie in ``[qmin, qmax]``; ``x_hat = (q - zero_point) * scale``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    axis: int | None = None
    narrow: bool = False

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[1]

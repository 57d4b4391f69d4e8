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
from .numerics.codes import MAX_BITS, MIN_BITS, qrange
from .numerics.rounding import ROUNDING_MODES

GRANULARITIES = ("tensor", "channel")
RANGE_MODES = ("static", "dynamic", "ema", "learned", "pact")
CLIP_AT = ("step", "codes", "window")


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
        step_bits: the step is sized as if the codes had ``step_bits`` bits while the stored codes are
            still clipped to ``bits`` (CQAT: 8-bit step, codes clipped to 4/5 bits).  For a clip value
            ``c`` (see ``clip_at``): ``s = c / Q(step_bits)`` with ``Q(b) = 2^b - 1`` (unsigned) or
            ``2^(b-1) - 1`` (signed), codes ``clamp(round(x / s), q_min(bits), q_max(bits))``.  ``None``
            means ``bits``; must be ``>= bits``.  Needs ``symmetric=True`` when ``> bits``.
        range_mode: how the scale evolves during training (QAT), see :class:`~hwquant.nn.FakeQuantizer`:
            ``"static"`` (calibrated once), ``"dynamic"`` (from ``max|x|`` of every forward), ``"ema"``
            (exponential moving average of the per-batch ``max|x|``, updated in training mode only),
            ``"learned"`` (LSQ: the step is a trained parameter), ``"pact"`` (PACT: a trained clip
            ``alpha``, ``s = alpha / Q``).  Non-static modes need ``symmetric=True``; ``"pact"`` needs
            ``granularity="tensor"``.
        ema_decay: ``d`` in ``m_t = d * m_(t-1) + (1 - d) * max|x_t|`` (``range_mode="ema"``), in ``[0, 1)``.
        clip_at: where a clip value ``c`` (an observer's clip, a tracked max, PACT's ``alpha``) lands:
            ``"step"``: at the top of the ``step_bits`` code range, ``s = c / Q(step_bits)`` (literal CQAT:
            ``s = max / 255``); ``"codes"``: at the top of the stored ``bits`` codes, ``s = c / Q(bits)``
            (the clipped code range covers ``[0, c]``).  Identical when ``step_bits`` is ``None``/``bits``.
            ``"window"``: a bit window of a ``step_bits``-wide quantizer (:mod:`hwquant.numerics.window`):
            ``c`` is the ``step_bits`` quantizer's range, ``d = c / Q(step_bits)``, and the stored codes are
            ``sat_bits(rne(sat_step_bits(rne(x / d)) / 2^shift))`` with one calibrated ``shift`` per tensor
            (the ``window`` observer); the effective step is ``2^shift * d``.  Needs ``observer="window"``,
            ``rounding="nearest"`` and a ``static`` / ``dynamic`` / ``ema`` range.
        pow2: round every step to the nearest power of two in the log domain, ``s = 2^round(log2 s)`` (fixed
            point: requantization becomes a shift and the integer model is bit-exact with the float one, see
            :mod:`hwquant.export.integer`).  Applied after calibration and after every ``dynamic`` / ``ema``
            update; not with ``learned`` / ``pact`` (their step is a trained parameter).
    """

    bits: int = 8
    signed: bool | None = True
    granularity: Literal["tensor", "channel"] = "tensor"
    rounding: str = "nearest"
    observer: str = "minmax"
    symmetric: bool = True
    narrow: bool = False
    observer_args: tuple[tuple[str, object], ...] = field(default=())
    step_bits: int | None = None
    range_mode: Literal["static", "dynamic", "ema", "learned", "pact"] = "static"
    ema_decay: float = 0.9
    clip_at: Literal["step", "codes", "window"] = "step"
    pow2: bool = False

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
        sb = self.step_bits
        if sb is not None and (isinstance(sb, bool) or not isinstance(sb, int) or not self.bits <= sb <= MAX_BITS):
            raise ConfigError(f"step_bits must be null or an integer in {self.bits}..{MAX_BITS} (>= bits), got {sb!r}")
        if self.range_mode not in RANGE_MODES:
            raise ConfigError(f"range_mode must be one of {', '.join(RANGE_MODES)}, got {self.range_mode!r}")
        d = self.ema_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ConfigError(f"ema_decay must be a number in [0, 1), got {d!r}")
        if self.clip_at not in CLIP_AT:
            raise ConfigError(f"clip_at must be one of {', '.join(CLIP_AT)}, got {self.clip_at!r}")
        if not self.symmetric and (self.range_mode != "static" or self.q_step_bits != self.bits):
            raise ConfigError(
                "symmetric must be true with step_bits > bits or a non-static range_mode "
                f"(got range_mode={self.range_mode!r}, step_bits={sb!r})"
            )
        if self.clip_at == "window" and (self.observer != "window" or self.rounding != "nearest"
                                         or self.range_mode not in ("static", "dynamic", "ema")):
            raise ConfigError("clip_at='window' needs observer='window', rounding='nearest' and a static, dynamic "
                              f"or ema range (got observer={self.observer!r}, rounding={self.rounding!r}, "
                              f"range_mode={self.range_mode!r})")
        if self.observer == "window" and self.clip_at != "window":
            raise ConfigError(f"observer 'window' needs clip_at='window', got clip_at={self.clip_at!r}")
        if not isinstance(self.pow2, bool):
            raise ConfigError(f"pow2 must be true or false, got {self.pow2!r}")
        if self.pow2 and self.range_mode in ("learned", "pact"):
            raise ConfigError(f"pow2 steps are not supported with range_mode={self.range_mode!r}")
        if self.range_mode == "pact" and self.granularity != "tensor":
            raise ConfigError(f"granularity must be 'tensor' with range_mode='pact', got {self.granularity!r}")

    @property
    def q_step_bits(self) -> int:
        """The width the step is sized for: ``step_bits``, or ``bits`` when ``step_bits`` is ``None``."""
        return self.bits if self.step_bits is None else self.step_bits

    def clip_levels(self, signed: bool) -> int:
        """``Q`` in ``s = c / Q`` for a clip ``c``: ``Q(step_bits)`` (``clip_at="step"`` / ``"window"``: the
        base step, before the window's ``2^shift``) or ``Q(bits)``.

        ``Q(b) = 2^(b-1) - 1`` for signed codes, ``2^b - 1`` for unsigned ones.

        >>> QuantSpec(bits=4, signed=False, step_bits=8).clip_levels(False)
        255
        """
        b = self.q_step_bits if self.clip_at in ("step", "window") else self.bits
        return qrange(b, signed)[1]

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

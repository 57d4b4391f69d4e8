"""Observer interface, registry, and the range -> (scale, zero point) rule shared by range observers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError, DataError
from ..numerics.codes import qrange
from ..spec import QuantParams, QuantSpec

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator adding an observer to :data:`OBSERVERS` under ``name``."""

    def deco(cls: type[Observer]) -> type[Observer]:
        OBSERVERS[name] = cls
        cls.name = name
        return cls

    return deco


class Observer:
    """Base class: streams tensors with :meth:`update`, returns params with :meth:`compute`."""

    name = "base"

    def __init__(self, spec: QuantSpec, axis: int | None = None) -> None:
        if spec.granularity == "channel" and axis is None:
            axis = 0
        if spec.granularity == "tensor":
            axis = None
        self.spec = spec
        self.axis = axis
        self.count = 0
        self.min_seen: torch.Tensor | None = None

    def reset(self) -> None:
        self.count = 0
        self.min_seen = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise DataError("non-finite value (NaN or inf) in a tensor being calibrated")
        lo = self._reduce(x, torch.amin)
        self.min_seen = lo if self.min_seen is None else torch.minimum(self.min_seen, lo)
        self.count += 1
        self._update(x)

    def _reduce(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Reduce over everything but ``axis`` (a 0-d tensor for per-tensor)."""
        if self.axis is None:
            return fn(x).float()
        ax = self.axis % x.dim()
        return fn(x.transpose(0, ax).reshape(x.shape[ax], -1), dim=1).float()

    def _update(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolved_signed(self) -> bool:
        """The spec's sign, or for ``signed=None`` whether any observed value was negative."""
        if self.spec.signed is not None:
            return self.spec.signed
        return bool((self.min_seen < 0).any())

    def peak_seen(self, signed: bool) -> torch.Tensor:
        """Running ``max|x|`` (signed) or ``max(max x, 0)`` (unsigned): 0-d per tensor, ``[C]`` per channel.

        Needs a subclass that tracks ``max_seen`` (every built-in observer does).
        """
        hi = self.max_seen.reshape(-1).float().cpu()
        lo = self.min_seen.reshape(-1).float().cpu()
        pk = torch.maximum(hi, -lo) if signed else hi.clamp_min(0.0)
        return pk.reshape(()) if self.axis is None else pk

    def summary(self) -> dict:
        """JSON-serialisable facts about the fit (clip value, fitted distribution...) for reports."""
        out: dict = {"observer": self.name}
        ggd = getattr(self, "ggd", None)
        if ggd is not None:
            out.update({k: float(getattr(ggd, k)) for k in ("alpha", "beta", "lam", "zero_mass") if hasattr(ggd, k)})
        return out

    def compute(self) -> QuantParams:
        if self.count == 0:
            raise DataError("observer saw no data: the calibration loader is empty")
        return self._compute()

    def _compute(self) -> QuantParams:  # pragma: no cover - abstract
        raise NotImplementedError


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, signed: bool, axis: int | None
) -> QuantParams:
    """Scale and zero point that map the range ``[lo, hi]`` onto the spec's codes.

    Symmetric (zero point 0): ``s = max(|lo|, |hi|) / Q``; for unsigned codes ``s = hi / Q``, where ``Q`` is
    :meth:`QuantSpec.clip_levels` (``q_max``, or ``q_max`` of ``step_bits`` for a CQAT-style 8-bit step).
    Affine: ``s = (hi - lo) / (q_max - q_min)``, ``z = clamp(q_min - round(lo / s))``; the range is first
    widened to contain 0 so that 0 is exactly representable (zero padding, ReLU).  An all-zero range
    gives ``s = 1``.
    """
    qmin, qmax = qrange(spec.bits, signed, spec.narrow)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if spec.symmetric:
        amax = torch.maximum(-lo, hi) if signed else hi
        scale = amax / spec.clip_levels(signed)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(qmin - torch.round(lo / safe), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return QuantParams(scale=scale, zero_point=zp, bits=spec.bits, signed=signed, axis=axis, narrow=spec.narrow)


def make_observer(spec: QuantSpec, axis: int | None = None) -> Observer:
    """Instantiate the observer named by ``spec.observer``."""
    try:
        cls = OBSERVERS[spec.observer]
    except KeyError:
        raise ConfigError(
            f"observer must be one of {', '.join(sorted(OBSERVERS))}, got {spec.observer!r}"
        ) from None
    return cls(spec, axis, **dict(spec.observer_args))

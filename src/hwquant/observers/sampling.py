"""Bounded, seeded random subsample of a stream (reservoir) and the base class of sample-based observers.

Calibration streams batches, so observers that need the distribution (percentile, MSE, KL, ACIQ, GGD) keep a
uniform random subsample of at most ``capacity`` values per row (per tensor: one row; per channel: one row
per channel) instead of every activation, plus exact running statistics (min, max, ``max|x|``, number of
zeros, number of values).  Everything kept is on the CPU (inputs on an accelerator are copied once per update).

**Reservoir by random keys.**  Every value gets an independent key ``u ~ U[0, 1)`` from a
``torch.Generator`` seeded with ``seed``; the reservoir keeps the ``capacity`` values with the smallest keys,
in arrival order.  That is a uniform sample without replacement of everything seen, it is deterministic given
the seed and the sequence of batches, and while the total fits (``n <= capacity``) it holds every value, so
streaming several batches equals one big update exactly.  Once full, new values whose key is not below the
current largest kept key are dropped at once; survivors are buffered and the buffer is compacted (a
``topk`` over keys) when it exceeds twice the capacity, so the cost per update is one ``rand`` plus a
comparison over the batch.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..spec import QuantParams, QuantSpec
from .base import Observer, params_from_range

DEFAULT_RESERVOIR = 2**20


def check_int_arg(name: str, value, lo: int) -> int:
    """Return ``value`` if it is an integer ``>= lo``, else raise :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"observer argument {name} must be an integer >= {lo}, got {value!r}")
    return value


def reject_unknown(observer: str, unknown: dict) -> None:
    """Raise :class:`ConfigError` listing observer arguments that ``observer`` does not take."""
    if unknown:
        raise ConfigError(f"unknown argument(s) for observer {observer!r}: {', '.join(sorted(unknown))}")


class Reservoir:
    """Uniform random subsample without replacement, per row, of every value passed to :meth:`add`.

    ``add(rows)`` takes a ``[R, n]`` tensor (``R`` fixed after the first call); :meth:`values` returns the
    kept ``[R, m]`` float32 values, ``m = min(capacity, total n)``, in arrival order.
    """

    def __init__(self, capacity: int = DEFAULT_RESERVOIR, seed: int = 0) -> None:
        self.capacity = check_int_arg("reservoir_size", capacity, 1)
        self.seed = check_int_arg("seed", seed, 0)
        self.reset()

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)
        self._vals: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._size = 0  # columns buffered
        self._thresh: torch.Tensor | None = None  # [R, 1] largest kept key once full
        self.seen = 0  # values per row seen so far

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(rows.shape[0], -1).float().cpu()  # the reservoir lives on the CPU
        r, n = rows.shape
        if self._vals and self._vals[0].shape[0] != r:
            raise ConfigError(f"reservoir rows changed from {self._vals[0].shape[0]} to {r} between updates")
        self.seen += n
        if n == 0:
            return
        keys = torch.rand((r, n), generator=self._gen)
        if self._thresh is not None and r == 1:
            keep = keys[0] < self._thresh[0, 0]
            rows, keys = rows[:, keep], keys[:, keep]  # indexing copies
            if keys.shape[1] == 0:
                return
        else:
            rows = rows.clone()  # never keep a view of the caller's (possibly reused) buffer
        self._vals.append(rows)
        self._keys.append(keys)
        self._size += keys.shape[1]
        if self._size > (2 * self.capacity if r == 1 else self.capacity):
            self._compact()

    def _compact(self) -> None:
        vals = torch.cat(self._vals, dim=1) if len(self._vals) > 1 else self._vals[0]
        keys = torch.cat(self._keys, dim=1) if len(self._keys) > 1 else self._keys[0]
        if keys.shape[1] > self.capacity:
            idx = torch.topk(keys, self.capacity, dim=1, largest=False, sorted=False).indices
            idx = torch.sort(idx, dim=1).values  # keep arrival order
            vals, keys = torch.gather(vals, 1, idx), torch.gather(keys, 1, idx)
            self._thresh = keys.amax(dim=1, keepdim=True)
        self._vals, self._keys, self._size = [vals], [keys], keys.shape[1]

    def values(self) -> torch.Tensor:
        """The kept values, ``[R, m]`` float32 (empty ``[0, 0]`` before any :meth:`add`)."""
        if not self._vals:
            return torch.empty(0, 0)
        self._compact()
        return self._vals[0]


class SamplingObserver(Observer):
    """Base of observers that look at the distribution: a :class:`Reservoir` plus exact running statistics.

    Keeps, per tensor (``axis=None``) or per channel along ``axis``: ``max_seen`` (max), ``absmax_seen``
    (max |x|), ``zeros`` and ``total`` (counts of exact zeros and of all values), and the reservoir.
    Subclasses implement :meth:`clip_values` (a clip ``c >= 0`` per row) or override ``_compute``.

    Observer arguments shared by all subclasses: ``reservoir_size`` (values kept per row, default ``2^20``)
    and ``seed`` (the reservoir's generator seed, default 0).
    """

    def __init__(
        self, spec: QuantSpec, axis: int | None = None, *, reservoir_size: int = DEFAULT_RESERVOIR, seed: int = 0
    ) -> None:
        super().__init__(spec, axis)
        self.reservoir = Reservoir(reservoir_size, seed)
        self._init_stats()
        self.clip: torch.Tensor | None = None  # per-row clip of the last compute(), for reports
        self.device = torch.device("cpu")  # where the observed tensors lived; params are returned there

    def _init_stats(self) -> None:
        self.max_seen: torch.Tensor | None = None
        self.absmax_seen: torch.Tensor | None = None
        self.zeros: torch.Tensor | None = None
        self.total = 0

    def reset(self) -> None:
        super().reset()
        self.reservoir.reset()
        self._init_stats()
        self.clip = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[R, n]``: one row per tensor, or one per channel along ``axis``."""
        if self.axis is None:
            return x.reshape(1, -1)
        ax = self.axis % x.dim()
        return x.movedim(ax, 0).reshape(x.shape[ax], -1)

    def _update(self, x: torch.Tensor) -> None:
        self.device = x.device
        rows = self._rows(x)
        hi = rows.amax(dim=1).float().cpu()
        z = (rows == 0).sum(dim=1).cpu()
        if self.max_seen is None:
            self.max_seen, self.zeros = hi, z
        else:
            self.max_seen = torch.maximum(self.max_seen, hi)
            self.zeros = self.zeros + z
        self.absmax_seen = torch.maximum(self.max_seen, -self.min_seen.reshape(-1).cpu())  # running max|x|
        self.total += rows.shape[1]
        self.reservoir.add(rows)

    # helpers for subclasses ---------------------------------------------------------------------------------
    def samples(self) -> torch.Tensor:
        """Reservoir contents ``[R, m]`` (float32)."""
        return self.reservoir.values()

    def peak(self, signed: bool) -> torch.Tensor:
        """Exact ``max|x|`` (signed) or ``max(max x, 0)`` (unsigned) per row, float32 ``[R]``."""
        return self.absmax_seen.clone() if signed else self.max_seen.clamp_min(0.0)

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row tensor ``[R]`` -> 0-d for per-tensor observers."""
        return t.reshape(()) if self.axis is None else t

    def params_from_clip(self, clip: torch.Tensor, signed: bool) -> QuantParams:
        """QuantParams for a clip ``c`` per row: the range ``[-c, c]`` (signed) or ``[0, c]`` (unsigned).

        Symmetric specs: ``scale = c / q_max``.  Affine specs (``symmetric=False``): the range is intersected
        with the observed ``[min, max]`` and mapped by :func:`params_from_range`.
        """
        clip = clip.float()
        lo = -clip if signed else torch.zeros_like(clip)
        hi = clip
        if not self.spec.symmetric:
            lo = torch.maximum(lo, self.min_seen.reshape(-1).cpu())
            hi = torch.minimum(hi, self.max_seen.reshape(-1))
        return params_from_range(self._shape(lo), self._shape(hi), self.spec, signed, self.axis)

    def clip_values(self, samples: torch.Tensor, signed: bool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute(self) -> QuantParams:
        signed = self.resolved_signed()
        self.clip = self.clip_values(self.samples(), signed)
        return self.params_from_clip(self.clip, signed)

    def compute(self) -> QuantParams:
        """:meth:`Observer.compute`, with scale and zero point moved to the device of the observed tensors."""
        p = super().compute()
        p.scale, p.zero_point = p.scale.to(self.device), p.zero_point.to(self.device)
        return p

    def summary(self) -> dict:
        """The base summary plus the clip value (per-tensor observers) of the last :meth:`compute`."""
        base = super().summary() if hasattr(super(), "summary") else {"observer": self.name}
        if self.clip is not None and self.clip.numel() == 1:
            base["clip"] = float(self.clip.reshape(()))
        return base

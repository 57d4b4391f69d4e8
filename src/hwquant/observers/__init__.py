"""Calibration observers: stream tensors in, get :class:`~hwquant.spec.QuantParams` out.

Every observer has the same interface::

    obs = make_observer(spec, axis=None)   # axis: channel axis for per-channel specs
    for x in batches: obs.update(x)
    params = obs.compute()

and is registered by name with :func:`register_observer`, so a :class:`~hwquant.spec.QuantSpec` selects it
with ``observer="minmax"``.  Registered: ``minmax``, ``percentile``, ``mse``, ``kl``, ``aciq``,
``ggd``, ``window``; extra arguments come from ``spec.observer_args`` (e.g. ``{"percentile": 99.9}``,
``{"dist": "gauss"}``).  The distribution-based observers keep a bounded seeded reservoir sample
(:mod:`hwquant.observers.sampling`).
"""

from .aciq import ACIQObserver, aciq_clip_ratio
from .base import OBSERVERS, Observer, make_observer, params_from_range, register_observer
from .fixedpoint import FixedPointObserver
from .ggd import GGDObserver
from .kl import KLObserver, kl_threshold_bins
from .minmax import MinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver
from .sampling import Reservoir, SamplingObserver
from .window import WindowObserver

__all__ = [
    "OBSERVERS",
    "ACIQObserver",
    "FixedPointObserver",
    "GGDObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "Reservoir",
    "SamplingObserver",
    "WindowObserver",
    "aciq_clip_ratio",
    "kl_threshold_bins",
    "make_observer",
    "params_from_range",
    "register_observer",
]

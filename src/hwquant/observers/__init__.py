"""Calibration observers: stream tensors in, get :class:`~hwquant.spec.QuantParams` out.

Every observer has the same interface::

    obs = make_observer(spec, axis=None)   # axis: channel axis for per-channel specs
    for x in batches: obs.update(x)
    params = obs.compute()

and is registered by name with :func:`register_observer`, so a :class:`~hwquant.spec.QuantSpec` selects it
with ``observer="minmax"``.
"""

from .base import OBSERVERS, Observer, make_observer, params_from_range, register_observer
from .minmax import MinMaxObserver

__all__ = ["OBSERVERS", "MinMaxObserver", "Observer", "make_observer", "params_from_range", "register_observer"]

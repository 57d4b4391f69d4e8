"""Quantization methods.  Each has a frozen, validated config dataclass that selects its handler."""

from .base import PTQ_HANDLERS, ptq, register_ptq
from .ggd_ptq import GGDPTQConfig, backward_forward_tuning
from .minmax import MinMaxPTQConfig, ObserverPTQConfig, observer_ptq

__all__ = [
    "PTQ_HANDLERS",
    "GGDPTQConfig",
    "MinMaxPTQConfig",
    "ObserverPTQConfig",
    "backward_forward_tuning",
    "observer_ptq",
    "ptq",
    "register_ptq",
]

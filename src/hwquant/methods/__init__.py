"""Quantization methods.  Each has a frozen, validated config dataclass that selects its handler."""

from .base import PTQ_HANDLERS, ptq, register_ptq
from .minmax import MinMaxPTQConfig, observer_ptq

__all__ = ["PTQ_HANDLERS", "MinMaxPTQConfig", "observer_ptq", "ptq", "register_ptq"]

"""Quantization methods.  Each has a frozen, validated config dataclass that selects its handler."""

from .base import PTQ_HANDLERS, ptq, register_ptq
from .ggd_ptq import GGDPTQConfig, backward_forward_tuning
from .minmax import MinMaxPTQConfig, ObserverPTQConfig, observer_ptq
from .qat import QAT_CONFIGS, CQATConfig, LSQConfig, PACTConfig, STEConfig, build_qat_model, prepare_qat, qat_summary

__all__ = [
    "CQATConfig",
    "LSQConfig",
    "PACTConfig",
    "PTQ_HANDLERS",
    "QAT_CONFIGS",
    "STEConfig",
    "build_qat_model",
    "prepare_qat",
    "qat_summary",
    "GGDPTQConfig",
    "MinMaxPTQConfig",
    "ObserverPTQConfig",
    "backward_forward_tuning",
    "observer_ptq",
    "ptq",
    "register_ptq",
]

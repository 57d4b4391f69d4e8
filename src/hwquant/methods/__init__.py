"""Quantization methods.  Each has a frozen, validated config dataclass that selects its handler."""

from .arc import ARCConfig, ARCHandle, prepare_arc
from .base import PTQ_HANDLERS, ptq, register_ptq
from .bft import backward_forward_tuning
from .ggd_ptq import GGDPTQConfig
from .minmax import MinMaxPTQConfig, ObserverPTQConfig, observer_ptq
from .mpq import MixedWeightQuantizer, MPQConfig, mpq_summary, schedule_mpq
from .qat import QAT_CONFIGS, CQATConfig, LSQConfig, PACTConfig, STEConfig, build_qat_model, prepare_qat, qat_summary

__all__ = [
    "ARCConfig",
    "ARCHandle",
    "CQATConfig",
    "LSQConfig",
    "MPQConfig",
    "MixedWeightQuantizer",
    "PACTConfig",
    "PTQ_HANDLERS",
    "QAT_CONFIGS",
    "STEConfig",
    "build_qat_model",
    "prepare_qat",
    "qat_summary",
    "mpq_summary",
    "schedule_mpq",
    "GGDPTQConfig",
    "MinMaxPTQConfig",
    "ObserverPTQConfig",
    "backward_forward_tuning",
    "observer_ptq",
    "prepare_arc",
    "ptq",
    "register_ptq",
]

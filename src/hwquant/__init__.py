"""hwquant: hardware-friendly quantization of convolutional networks.

Layers run one way: ``numerics`` (pure math) <- ``observers`` / ``nn`` (quantized layers) <- ``methods``
<- ``saved`` (``hq.save`` / ``hq.load``) <- ``pipelines`` / ``cli``.
"""

from . import export, hw, numerics
from .errors import CheckpointError, ConfigError, DataError, HwquantError
from .methods import (
    ARCConfig,
    CQATConfig,
    GGDPTQConfig,
    LSQConfig,
    MinMaxPTQConfig,
    MPQConfig,
    PACTConfig,
    STEConfig,
    prepare_arc,
    prepare_qat,
    ptq,
)
from .nn import LayerQuant, QuantRecipe, calibrate, fold_batchnorm, quantize_model
from .saved import load, save
from .spec import QuantParams, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "ARCConfig",
    "CQATConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GGDPTQConfig",
    "HwquantError",
    "LSQConfig",
    "LayerQuant",
    "MPQConfig",
    "MinMaxPTQConfig",
    "PACTConfig",
    "QuantParams",
    "QuantRecipe",
    "QuantSpec",
    "STEConfig",
    "__version__",
    "calibrate",
    "export",
    "fold_batchnorm",
    "hw",
    "load",
    "numerics",
    "prepare_arc",
    "prepare_qat",
    "ptq",
    "quantize_model",
    "save",
]

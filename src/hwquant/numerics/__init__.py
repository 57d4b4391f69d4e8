"""Pure quantization math on tensors: no modules, no state.

Every function here is checked against an independent oracle in ``tests/numerics``.
"""

from .metrics import mse, sqnr_db
from .rounding import ROUNDING_MODES, check_rounding, round_tensor
from .uniform import (
    MAX_BITS,
    MIN_BITS,
    check_bits,
    code_dtype,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
)

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "ROUNDING_MODES",
    "check_bits",
    "check_rounding",
    "code_dtype",
    "dequantize",
    "fake_quantize",
    "mse",
    "qrange",
    "quantize",
    "round_tensor",
    "sqnr_db",
]

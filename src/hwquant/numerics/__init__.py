"""Pure quantization math on tensors: no modules, no state.

Every function here is checked against an independent oracle in ``tests/numerics``.
"""

from .fixed_point import (
    best_fraction_length,
    best_fraction_length_per_channel,
    fixed_point_scale,
    fl_search_range,
    fraction_length_errors,
)
from .ggd import GGD, expected_mse, ggd_fit, ggd_optimal_step, hui_neuhoff_step, power_of_two_step
from .gradient import (
    GRAD_CLIPS,
    GRAD_ROUNDINGS,
    dequantize_gradient,
    fake_quantize_gradient,
    fake_quantize_gradient_rows,
    gradient_clip,
    gradient_stats,
    quantize_gradient,
    quantize_gradient_rows,
)
from .metrics import mse, sqnr_db
from .rounding import ROUNDING_MODES, check_rounding, round_tensor
from .uniform import (
    MAX_BITS,
    MIN_BITS,
    check_bits,
    code_dtype,
    dequantize,
    fake_quantize,
    native_status,
    pact_fake_quantize,
    qrange,
    quantize,
)

__all__ = [
    "GGD",
    "GRAD_CLIPS",
    "GRAD_ROUNDINGS",
    "dequantize_gradient",
    "fake_quantize_gradient",
    "fake_quantize_gradient_rows",
    "gradient_clip",
    "gradient_stats",
    "quantize_gradient",
    "quantize_gradient_rows",
    "MAX_BITS",
    "MIN_BITS",
    "ROUNDING_MODES",
    "best_fraction_length",
    "best_fraction_length_per_channel",
    "check_bits",
    "check_rounding",
    "code_dtype",
    "dequantize",
    "expected_mse",
    "fake_quantize",
    "fixed_point_scale",
    "fl_search_range",
    "fraction_length_errors",
    "ggd_fit",
    "ggd_optimal_step",
    "hui_neuhoff_step",
    "power_of_two_step",
    "mse",
    "native_status",
    "pact_fake_quantize",
    "qrange",
    "quantize",
    "round_tensor",
    "sqnr_db",
]

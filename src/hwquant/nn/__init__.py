"""Quantized layers and the model transforms that build them."""

from .bias import correct_bias
from .fold import conv_bn_pairs, fold_batchnorm, fold_conv_bn, fold_input_gain
from .graph import LayerPositions, layer_positions, trace
from .layers import LUT_ACTIVATIONS, QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear, QuantLUTAct
from .quantizer import FakeQuantizer
from .relu import AbsorbedReLU, SharedReLU, absorb_relus
from .swap import (
    LayerQuant,
    QuantRecipe,
    calibrate,
    calibrate_weights,
    float_eval_layers,
    quant_layers,
    quantize_model,
    quantizers,
    set_quant_enabled,
)

__all__ = [
    "AbsorbedReLU",
    "LUT_ACTIVATIONS",
    "QUANT_LAYERS",
    "LayerPositions",
    "QuantLUTAct",
    "FakeQuantizer",
    "LayerQuant",
    "absorb_relus",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "QuantRecipe",
    "SharedReLU",
    "calibrate",
    "calibrate_weights",
    "conv_bn_pairs",
    "correct_bias",
    "fold_batchnorm",
    "fold_conv_bn",
    "fold_input_gain",
    "layer_positions",
    "float_eval_layers",
    "quant_layers",
    "quantize_model",
    "quantizers",
    "set_quant_enabled",
    "trace",
]

"""Quantized layers and the model transforms that build them."""

from .fold import conv_bn_pairs, fold_batchnorm, fold_conv_bn
from .layers import QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear
from .quantizer import FakeQuantizer
from .swap import (
    LayerQuant,
    QuantRecipe,
    calibrate,
    calibrate_weights,
    quant_layers,
    quantize_model,
    quantizers,
    set_quant_enabled,
)

__all__ = [
    "QUANT_LAYERS",
    "FakeQuantizer",
    "LayerQuant",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "QuantRecipe",
    "calibrate",
    "calibrate_weights",
    "conv_bn_pairs",
    "fold_batchnorm",
    "fold_conv_bn",
    "quant_layers",
    "quantize_model",
    "quantizers",
    "set_quant_enabled",
]

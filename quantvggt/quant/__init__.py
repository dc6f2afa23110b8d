"""QuantVGGT post-training quantization: configs, the ``quantize_`` entry point, layers and checkpoints."""

from quantvggt.quant.api import QuantReport, quantize_
from quantvggt.quant.checkpoint import load_quantized, save_quantized
from quantvggt.quant.config import (
    RECIPES,
    QuantConfig,
    QuantVGGTConfig,
    QuaRotConfig,
    RTNConfig,
    SmoothQuantConfig,
    get_recipe,
)
from quantvggt.quant.linear import FakeQuantLinear, QuantLinear

__all__ = [
    "RECIPES",
    "FakeQuantLinear",
    "QuaRotConfig",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "QuantVGGTConfig",
    "RTNConfig",
    "SmoothQuantConfig",
    "get_recipe",
    "load_quantized",
    "quantize_",
    "save_quantized",
]

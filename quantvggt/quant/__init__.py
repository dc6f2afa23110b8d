"""QuantVGGT post-training quantization: configs, the ``quantize_`` entry point, layers and checkpoints."""

from quantvggt.quant import methods as _methods  # noqa: F401  (registers the built-in handlers)
from quantvggt.quant.api import QuantReport, quantize_, register_quantize_handler
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
from quantvggt.quant.linear import FakeQuantLinear, QuantConv2d, QuantConv2dSpec, QuantLinear, QuantLinearSpec
from quantvggt.quant.steps import QuantJob

__all__ = [
    "RECIPES",
    "FakeQuantLinear",
    "QuaRotConfig",
    "QuantConfig",
    "QuantConv2d",
    "QuantConv2dSpec",
    "QuantJob",
    "QuantLinear",
    "QuantLinearSpec",
    "QuantReport",
    "QuantVGGTConfig",
    "RTNConfig",
    "SmoothQuantConfig",
    "get_recipe",
    "load_quantized",
    "quantize_",
    "register_quantize_handler",
    "save_quantized",
]

"""Checkpoint-compatible VGGT re-implementation."""

from quantvggt.model.config import (
    AggregatorConfig,
    CameraHeadConfig,
    DPTHeadConfig,
    TrackHeadConfig,
    VGGTConfig,
)
from quantvggt.model.loading import load_vggt
from quantvggt.model.vggt import VGGT

__all__ = [
    "VGGT",
    "AggregatorConfig",
    "CameraHeadConfig",
    "DPTHeadConfig",
    "TrackHeadConfig",
    "VGGTConfig",
    "load_vggt",
]

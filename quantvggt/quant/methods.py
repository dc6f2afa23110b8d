"""The built-in methods, each a handler over the shared steps (a new method: a config class + one handler)."""

from __future__ import annotations

from quantvggt.quant import steps
from quantvggt.quant.api import register_quantize_handler
from quantvggt.quant.config import QuantVGGTConfig, QuaRotConfig, RTNConfig, SmoothQuantConfig
from quantvggt.quant.steps import QuantJob


@register_quantize_handler(RTNConfig)
def rtn(job: QuantJob) -> None:
    """Round to nearest."""
    steps.wrap(job)


@register_quantize_handler(SmoothQuantConfig)
def smoothquant(job: QuantJob) -> None:
    """Smoothing from calibration statistics, then round to nearest."""
    cfg: SmoothQuantConfig = job.config  # type: ignore[assignment]
    steps.add_smoothing(job, cfg.alpha)
    steps.wrap(job)


@register_quantize_handler(QuaRotConfig)
def quarot(job: QuantJob) -> None:
    """Randomised Hadamard rotation, then round to nearest."""
    steps.add_rotation(job)
    steps.wrap(job)


@register_quantize_handler(QuantVGGTConfig)
def quantvggt(job: QuantJob) -> None:
    """Dual-smoothed fine-grained quantization: rotation, smoothing, learned clipping by block reconstruction."""
    cfg: QuantVGGTConfig = job.config  # type: ignore[assignment]
    steps.add_rotation(job)
    steps.add_smoothing(job, cfg.alpha, cfg.alpha_grid)
    steps.wrap(job, learn_smooth=cfg.learn_smooth, lwc=cfg.lwc, lac=cfg.lac, clip_init=cfg.clip_init)
    steps.reconstruct(job, cfg.epochs, cfg.lr_scale, cfg.lr_clip, cfg.weight_decay)

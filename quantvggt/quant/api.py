"""``quantize_(model, config, calibration)``: dispatches on ``type(config)`` through a handler registry.

Each method registers a handler with :func:`register_quantize_handler`; the handler composes the named steps
of :mod:`quantvggt.quant.steps` on a :class:`~quantvggt.quant.steps.QuantJob`. ``quantize_`` does what every
method shares: pick the target layers, prepare calibration data, run the handler, freeze, and report.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from quantvggt.quant.calibrate import as_batch
from quantvggt.quant.config import QuantConfig
from quantvggt.quant.steps import QuantJob, freeze, select_convs, select_targets

log = logging.getLogger(__name__)
__all__ = ["QuantReport", "quantize_", "register_quantize_handler", "select_convs", "select_targets"]

Handler = Callable[[QuantJob], None]
H = TypeVar("H", bound=Handler)
_HANDLERS: dict[type[QuantConfig], Handler] = {}


def register_quantize_handler(config_cls: type[QuantConfig]) -> Callable[[H], H]:
    """Decorator: ``handler(job)`` quantizes for configs of exactly type ``config_cls``."""

    def deco(fn: H) -> H:
        _HANDLERS[config_cls] = fn
        return fn

    return deco


COMPONENTS = ("aggregator.patch_embed", "aggregator", "camera_head", "depth_head", "point_head", "track_head")
CalibItem = Tensor | dict[str, Any]


@dataclass
class QuantReport:
    """What quantization did: per-layer settings and losses, bytes per component, compression."""

    recipe: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    block_loss: dict[str, tuple[float, float]] = field(default_factory=dict)
    bytes_by_component: dict[str, int] = field(default_factory=dict)
    fp32_bytes: int = 0
    fp16_bytes: int = 0
    quantized_bytes: int = 0
    bytes_16bit: int = 0
    calibration_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def compression_vs_fp16(self) -> float:
        """fp16 model bytes / quantized model bytes with its unquantized float tensors also at 16 bits."""
        return self.fp16_bytes / max(self.bytes_16bit, 1)

    @property
    def compression_vs_fp32(self) -> float:
        """fp32 model bytes / quantized model bytes."""
        return self.fp32_bytes / max(self.quantized_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "recipe": self.recipe,
            "num_quantized_layers": len(self.layers),
            "bytes_by_component": self.bytes_by_component,
            "fp32_bytes": self.fp32_bytes,
            "fp16_bytes": self.fp16_bytes,
            "quantized_bytes": self.quantized_bytes,
            "bytes_16bit": self.bytes_16bit,
            "compression_vs_fp16": round(self.compression_vs_fp16, 4),
            "compression_vs_fp32": round(self.compression_vs_fp32, 4),
            "calibration_ids": self.calibration_ids,
            "seconds": round(self.seconds, 3),
            "block_loss": {k: list(v) for k, v in self.block_loss.items()},
        }


def component_of(name: str) -> str:
    """Which reporting component a parameter/buffer name belongs to."""
    for c in COMPONENTS:
        if name == c or name.startswith(c + "."):
            return c
    return "other"


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the persistent state (parameters and buffers) per component."""
    out: dict[str, int] = {}
    for name, t in model.state_dict().items():
        out[component_of(name)] = out.get(component_of(name), 0) + t.numel() * t.element_size()
    return out


def bytes_at_16bit(model: nn.Module) -> int:
    """State bytes if every float tensor were stored at 16 bits (integer/packed tensors as they are)."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())


def source_sha256(model: nn.Module) -> str:
    """SHA-256 over the float state dict (sorted keys, raw bytes): identifies the source weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unpack_calibration(calibration: Iterable[CalibItem] | None) -> tuple[list[Tensor], list[str]]:
    batches, ids = [], []
    for i, item in enumerate(calibration or []):
        if isinstance(item, dict):
            batches.append(as_batch(item["images"]))
            ids.append(str(item.get("id", i)))
        else:
            batches.append(as_batch(item))
            ids.append(str(i))
    return batches, ids


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[CalibItem] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> QuantReport:
    """Quantize ``model`` in place per ``config``; ``calibration`` yields image batches (or dicts with id/images).

    ``on_progress(step, done, total)`` reports long steps (block-wise reconstruction) to a caller's progress bar.
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
        raise ValueError(f"no quantize handler for {type(config).__name__}; register one (known: {known})")
    if getattr(model, "quant_meta", None):
        raise ValueError("model is already quantized")
    t0 = time.perf_counter()
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    sha = source_sha256(model)
    batches, ids = _unpack_calibration(calibration)
    if config.needs_calibration and not batches:
        raise ValueError(f"{config.name} needs calibration images; pass calibration=[images, ...]")
    device = next(model.parameters()).device
    job = QuantJob(model, config, [b.to(device) for b in batches], select_targets(model, config))
    job.on_progress = on_progress
    was_training = model.training
    model.eval()
    try:
        handler(job)
        freeze(job)
    finally:
        model.train(was_training)
    by_comp = model_bytes(model)
    report = QuantReport(
        recipe=config.name,
        layers=job.layers,
        block_loss=job.block_loss,
        bytes_by_component=by_comp,
        fp32_bytes=fp32_bytes,
        fp16_bytes=fp32_bytes // 2,
        quantized_bytes=sum(by_comp.values()),
        bytes_16bit=bytes_at_16bit(model),
        calibration_ids=ids,
        seconds=time.perf_counter() - t0,
    )
    model.quant_meta = {
        "config": config.to_dict(),
        "layers": {n: {k: v for k, v in d.items() if k != "block_loss"} for n, d in job.layers.items()},
        "convs": job.convs,
        "block_loss": {k: list(v) for k, v in job.block_loss.items()},
        "calibration_ids": ids,
        "source_sha256": sha,
    }
    log.info(
        "quantized %d layers with %s in %.1fs (%.2fx smaller than fp16)",
        len(job.layers),
        config.name,
        report.seconds,
        report.compression_vs_fp16,
    )
    return report

"""``quantize_(model, config, calibration)``: the single entry point, dispatching on the config type."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from quantvggt.quant.calibrate import (
    _set_module,
    as_batch,
    collect_input_absmax,
    reconstruct_aggregator,
    smoothing_scales,
)
from quantvggt.quant.config import QuantConfig, QuantVGGTConfig
from quantvggt.lowbit.hadamard import HadamardPlan, random_signs, rotate
from quantvggt.quant.linear import FakeQuantLinear, QuantConv2d

log = logging.getLogger(__name__)

COMPONENTS = ("aggregator.patch_embed", "aggregator", "camera_head", "depth_head", "point_head", "track_head")
CalibItem = Union[Tensor, dict[str, Any]]


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


def select_targets(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Linear, int, int]]:
    """Linear layers to quantize under ``config.scope`` with their (w_bits, a_bits)."""
    prefixes = []
    if "aggregator" in config.scope:
        prefixes += ["aggregator.frame_blocks.", "aggregator.global_blocks."]
    if "patch_embed" in config.scope:
        prefixes += ["aggregator.patch_embed.blocks."]
    if "camera_head" in config.scope:
        prefixes += ["camera_head.trunk.", "camera_head.poseLN_modulation.", "camera_head.pose_branch."]
    out: dict[str, tuple[nn.Linear, int, int]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not name.startswith(tuple(prefixes)):
            continue
        if mod.in_features % 2 or mod.in_features < 8:
            log.info("not quantizing %s: in_features %d cannot be packed/rotated", name, mod.in_features)
            continue
        w, a = config.w_bits, config.a_bits
        for pattern, bits in config.layer_bits.items():
            if fnmatch.fnmatch(name, pattern):
                w, a = bits
        out[name] = (mod, w, a)
    if not out and "dpt_heads" not in config.scope:
        raise ValueError(f"scope {config.scope} selects no linear layers in this model")
    return out


def select_convs(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Convolutions of the DPT heads (depth, point, track feature extractor) when ``dpt_heads`` is in scope."""
    if "dpt_heads" not in config.scope:
        return {}
    prefixes = ("depth_head.", "point_head.", "track_head.feature_extractor.")
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
        and n.startswith(prefixes)
        and m.groups == 1
        and tuple(m.dilation) == (1, 1)
        and (not isinstance(m, nn.ConvTranspose2d) or tuple(m.output_padding) == (0, 0))
    }


@torch.no_grad()
def best_smoothing(
    lin: nn.Linear,
    w_rot: Tensor,
    absmax: Tensor,
    x: Tensor,
    signs: Tensor | None,
    w_bits: int,
    a_bits: int,
    grid: tuple[float, ...],
) -> Tensor:
    """Smoothing scales for the alpha in ``grid`` that minimises this layer's fake-quant output MSE on ``x``."""
    ref = lin(x)
    best, best_err = None, float("inf")
    for alpha in grid:
        s = smoothing_scales(absmax, w_rot, alpha)
        fake = FakeQuantLinear(lin, w_bits, a_bits, signs, s)
        err = float((fake(x) - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    assert best is not None
    return best


def _layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


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


def quantize_(model: nn.Module, config: QuantConfig, calibration: Iterable[CalibItem] | None = None) -> QuantReport:
    """Quantize ``model`` in place per ``config``; ``calibration`` yields image batches (or dicts with id/images)."""
    if getattr(model, "quant_meta", None):
        raise ValueError("model is already quantized")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    sha = source_sha256(model)
    batches, ids = _unpack_calibration(calibration)
    batches = [b.to(device) for b in batches]
    needs_data = config.smooth or isinstance(config, QuantVGGTConfig)
    if needs_data and not batches:
        raise ValueError(f"{config.name} needs calibration images; pass calibration=[images, ...]")
    was_training = model.training
    model.eval()
    targets = select_targets(model, config)
    signs = {
        n: (random_signs(m.in_features, _layer_seed(config.seed, n)).to(device) if config.rotate else None)
        for n, (m, _, _) in targets.items()
    }
    if config.rotate:
        for n, (m, _, _) in targets.items():
            HadamardPlan.for_width(m.in_features)  # fail early on unsupported widths
    smooth: dict[str, Tensor | None] = {n: None for n in targets}
    if config.smooth:
        grid = tuple(getattr(config, "alpha_grid", ()) or ())
        with torch.no_grad():
            stats, samples = collect_input_absmax(
                model,
                {n: m for n, (m, _, _) in targets.items()},
                signs,
                batches,
                keep_tokens=2048 if grid else 0,
                seed=config.seed,
            )
        for n, (m, w_bits, a_bits) in targets.items():
            w = m.weight.detach().float()
            w_rot = rotate(w, signs[n], HadamardPlan.for_width(m.in_features)) if signs[n] is not None else w
            if grid:
                smooth[n] = best_smoothing(m, w_rot, stats[n], samples[n], signs[n], w_bits, a_bits, grid)
            else:
                smooth[n] = smoothing_scales(stats[n], w_rot, config.alpha)  # type: ignore[attr-defined]
    learn = isinstance(config, QuantVGGTConfig)
    fakes: dict[str, FakeQuantLinear] = {}
    for n, (m, w_bits, a_bits) in targets.items():
        in_agg = n.startswith(("aggregator.frame_blocks.", "aggregator.global_blocks."))
        fakes[n] = FakeQuantLinear(
            m,
            w_bits,
            a_bits,
            signs[n],
            smooth[n],
            learn_smooth=learn and in_agg and config.smooth and config.learn_smooth,  # type: ignore[attr-defined]
            lwc=learn and in_agg and config.lwc,  # type: ignore[attr-defined]
            lac=learn and in_agg and config.lac,  # type: ignore[attr-defined]
            clip_init=getattr(config, "clip_init", 4.0),
        )
    block_loss: dict[str, tuple[float, float]] = {}
    if learn and "aggregator" in config.scope:
        cfg: QuantVGGTConfig = config  # type: ignore[assignment]
        for p in model.parameters():
            p.requires_grad_(False)
        block_loss = reconstruct_aggregator(
            model, fakes, batches, cfg.epochs, cfg.lr_scale, cfg.lr_clip, cfg.weight_decay
        )
    layers: dict[str, dict[str, Any]] = {}
    for n, fake in fakes.items():
        ql = fake.to_quant_linear()
        _set_module(model, n, ql)
        blk = n.rsplit(".", 2)[0]
        layers[n] = {
            "in_features": ql.in_features,
            "out_features": ql.out_features,
            "w_bits": ql.w_bits,
            "a_bits": ql.a_bits,
            "bias": ql.bias is not None,
            "rotate": ql.rotate,
            "block_loss": list(block_loss[blk]) if blk in block_loss else None,
        }
    conv_bits = 8 if config.w_bits == 8 else 4
    convs: dict[str, dict[str, Any]] = {}
    for n, conv in select_convs(model, config).items():
        qc = QuantConv2d.from_float(conv, conv_bits)
        _set_module(model, n, qc)
        convs[n] = {
            "in_channels": qc.in_channels,
            "out_channels": qc.out_channels,
            "kernel_size": list(qc.kernel_size),
            "stride": list(qc.stride),
            "padding": list(qc.padding),
            "bias": qc.bias is not None,
            "w_bits": conv_bits,
            "transposed": qc.transposed,
        }
    model.train(was_training)
    by_comp = model_bytes(model)
    report = QuantReport(
        recipe=config.name,
        layers=layers,
        block_loss=block_loss,
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
        "layers": layers,
        "convs": convs,
        "calibration_ids": ids,
        "source_sha256": sha,
    }  # type: ignore[assignment]
    log.info(
        "quantized %d layers with %s in %.1fs (%.2fx smaller than fp16)",
        len(layers),
        config.name,
        report.seconds,
        report.compression_vs_fp16,
    )
    return report

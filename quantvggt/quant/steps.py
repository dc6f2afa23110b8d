"""Named steps that quantization methods compose: select, rotate, smooth, wrap, reconstruct, freeze.

A method's handler (see :mod:`quantvggt.quant.methods`) calls the steps it needs on one :class:`QuantJob`;
``quantize_`` selects the targets before the handler runs and freezes the wrapped layers after it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quantvggt.lowbit.hadamard import HadamardPlan, random_signs, rotate
from quantvggt.quant.calibrate import collect_input_absmax, reconstruct_aggregator, set_module, smoothing_scales
from quantvggt.quant.config import QuantConfig
from quantvggt.quant.linear import FakeQuantLinear, QuantConv2d

log = logging.getLogger(__name__)

AGGREGATOR_BLOCKS = ("aggregator.frame_blocks.", "aggregator.global_blocks.")


@dataclass
class Target:
    """A linear layer chosen for quantization and its bit widths."""

    module: nn.Linear
    w_bits: int
    a_bits: int


@dataclass
class QuantJob:
    """The state of one ``quantize_`` call, handed from step to step."""

    model: nn.Module
    config: QuantConfig
    batches: list[Tensor]  # calibration images, each [B, S, 3, H, W], on the model's device
    targets: dict[str, Target]
    signs: dict[str, Tensor | None] = field(default_factory=dict)  # ±1 per input channel when rotated
    smooth: dict[str, Tensor | None] = field(default_factory=dict)  # smoothing scales per input channel
    fakes: dict[str, FakeQuantLinear] = field(default_factory=dict)
    block_loss: dict[str, tuple[float, float]] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # frozen linear layers: spec + block loss
    convs: dict[str, dict[str, Any]] = field(default_factory=dict)  # frozen convolutions: spec
    on_progress: Callable[[str, int, int], None] | None = None  # (step, done, total): a CLI's progress bar

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on which other layers are quantized."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def select_targets(model: nn.Module, config: QuantConfig) -> dict[str, Target]:
    """Linear layers to quantize under ``config.scope`` with their bit widths."""
    prefixes: list[str] = []
    if "aggregator" in config.scope:
        prefixes += list(AGGREGATOR_BLOCKS)
    if "patch_embed" in config.scope:
        prefixes += ["aggregator.patch_embed.blocks."]
    if "camera_head" in config.scope:
        prefixes += ["camera_head.trunk.", "camera_head.poseLN_modulation.", "camera_head.pose_branch."]
    out: dict[str, Target] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not name.startswith(tuple(prefixes)):
            continue
        if mod.in_features % 2 or mod.in_features < 8:
            log.info("not quantizing %s: in_features %d cannot be packed/rotated", name, mod.in_features)
            continue
        w_bits, a_bits = config.bits_for(name)
        if w_bits < 16:  # (16, 16) in layer_bits keeps the layer float (mixed precision)
            out[name] = Target(mod, w_bits, a_bits)
    if not out and "dpt_heads" not in config.scope and not any(b == (16, 16) for b in config.layer_bits.values()):
        raise ValueError(f"scope {config.scope} selects no linear layers in this model")
    return out


def select_convs(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Convolutions of the DPT heads (depth, point, track feature extractor) when ``dpt_heads`` is in scope."""
    if "dpt_heads" not in config.scope:
        return {}
    prefixes = ("depth_head.", "point_head.", "track_head.feature_extractor.")
    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) or not n.startswith(prefixes):
            continue
        plain = m.groups == 1 and tuple(m.dilation) == (1, 1)
        if plain and (not isinstance(m, nn.ConvTranspose2d) or tuple(m.output_padding) == (0, 0)):
            out[n] = m
    return out


def add_rotation(job: QuantJob) -> None:
    """Seeded random ±1 signs per target: each layer's input is rotated by ``diag(signs) H / sqrt(n)``."""
    for n, t in job.targets.items():
        HadamardPlan.for_width(t.module.in_features)  # fail before any work on a width with no rotation
        job.signs[n] = random_signs(t.module.in_features, layer_seed(job.config.seed, n)).to(job.device)


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
        err = float((FakeQuantLinear(lin, w_bits, a_bits, signs, s)(x) - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    assert best is not None
    return best


def add_smoothing(job: QuantJob, alpha: float, grid: tuple[float, ...] = ()) -> None:
    """Per-channel smoothing ``max|XR|^a / max|WR|^(1-a)`` from calibration activations (after rotation, if any).

    With a ``grid``, each layer takes the alpha that minimises its own fake-quant output error.
    """
    modules = {n: t.module for n, t in job.targets.items()}
    signs = {n: job.signs.get(n) for n in job.targets}
    with torch.no_grad():
        stats, samples = collect_input_absmax(
            job.model, modules, signs, job.batches, keep_tokens=2048 if grid else 0, seed=job.config.seed
        )
    for n, t in job.targets.items():
        w = t.module.weight.detach().float()
        sg = signs[n]
        w_rot = rotate(w, sg, HadamardPlan.for_width(t.module.in_features)) if sg is not None else w
        if grid:
            job.smooth[n] = best_smoothing(t.module, w_rot, stats[n], samples[n], sg, t.w_bits, t.a_bits, grid)
        else:
            job.smooth[n] = smoothing_scales(stats[n], w_rot, alpha)


def wrap(
    job: QuantJob, learn_smooth: bool = False, lwc: bool = False, lac: bool = False, clip_init: float = 4.0
) -> None:
    """Wrap every target in a :class:`FakeQuantLinear` with its rotation and smoothing.

    Learnable smoothing/clipping is enabled only inside the aggregator's blocks: those are what block-wise
    reconstruction fits; elsewhere the parameters would stay at their initial values.
    """
    for n, t in job.targets.items():
        in_agg = n.startswith(AGGREGATOR_BLOCKS)
        smooth = job.smooth.get(n)
        job.fakes[n] = FakeQuantLinear(
            t.module,
            t.w_bits,
            t.a_bits,
            job.signs.get(n),
            smooth,
            learn_smooth=learn_smooth and in_agg and smooth is not None,
            lwc=lwc and in_agg,
            lac=lac and in_agg,
            clip_init=clip_init,
        )


def reconstruct(job: QuantJob, epochs: int, lr_scale: float, lr_clip: float, weight_decay: float) -> None:
    """Block-wise reconstruction over the aggregator in execution order (no-op when it is not in scope)."""
    if "aggregator" not in job.config.scope:
        return
    for p in job.model.parameters():
        p.requires_grad_(False)
    job.block_loss = reconstruct_aggregator(
        job.model, job.fakes, job.batches, epochs, lr_scale, lr_clip, weight_decay, on_block=job.on_progress
    )


def freeze(job: QuantJob) -> None:
    """Replace each wrapped layer by its packed :class:`QuantLinear`, and in-scope convolutions by weight-only ones."""
    for n, fake in job.fakes.items():
        ql = fake.to_quant_linear()
        set_module(job.model, n, ql)
        blk = n.rsplit(".", 2)[0]
        job.layers[n] = {
            **ql.spec().to_dict(),
            "block_loss": list(job.block_loss[blk]) if blk in job.block_loss else None,
        }
    conv_bits = 8 if job.config.w_bits == 8 else 4
    for n, conv in select_convs(job.model, job.config).items():
        qc = QuantConv2d.from_float(conv, conv_bits)
        set_module(job.model, n, qc)
        job.convs[n] = qc.spec().to_dict()

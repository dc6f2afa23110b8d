"""Mixed precision under a memory budget: per-layer sensitivity on calibration data, then a greedy bit map.

Sensitivity of a layer at a width is the model's output error (camera pose encoding and depth, relative squared
error against full precision, averaged over the calibration batches) when that layer alone is quantized at that
width with a Hadamard-rotated round-to-nearest probe. The bit map starts every target layer in float (16) and
repeatedly lowers the layer whose next width (16 -> 8 -> 4) costs the least error per byte saved, until the
model fits the budget. Errors are assumed additive across layers (the usual first-order assumption).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantvggt.lowbit.hadamard import random_signs
from quantvggt.quant.calibrate import set_module
from quantvggt.quant.config import QuantConfig
from quantvggt.quant.linear import FakeQuantLinear
from quantvggt.quant.steps import layer_seed, select_convs, select_targets

log = logging.getLogger(__name__)
WIDTHS = (16, 8, 4)  # the order a layer's precision is lowered in
OUTPUTS = ("pose_enc", "depth")


class BudgetUnreachableError(ValueError):
    """The size budget cannot be met even with every layer in scope at its lowest width."""


def linear_bytes(layer: nn.Linear, w_bits: int) -> int:
    """At-rest bytes of a linear layer at ``w_bits`` (16 = float16), scales and signs included, floats at 16 bit."""
    n_in, n_out = layer.in_features, layer.out_features
    bias = 2 * n_out if layer.bias is not None else 0
    if w_bits >= 16:
        return 2 * n_in * n_out + bias
    weights = n_out * n_in // 2 if w_bits == 4 else n_out * n_in
    return weights + 2 * n_out + 2 * n_in + 2 + n_in + bias  # + w_scale, act_scale, act_clip, signs (int8)


def conv_bytes(conv: nn.Module, w_bits: int) -> int:
    """At-rest bytes of a weight-only quantized convolution."""
    w = conv.weight
    out = w.shape[1] if isinstance(conv, nn.ConvTranspose2d) else w.shape[0]
    fan = w.numel() // out
    fan += fan % 2 if w_bits == 4 else 0
    return out * fan * w_bits // 8 + 2 * out + (2 * out if conv.bias is not None else 0)


def fp16_bytes(model: nn.Module) -> int:
    """State bytes of the float model with every float tensor at 16 bits."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[Tensor]) -> list[dict[str, Tensor]]:
    return [{k: v.float() for k, v in model(b).items() if k in OUTPUTS} for b in batches]


def _error(got: list[dict[str, Tensor]], ref: list[dict[str, Tensor]]) -> float:
    total = 0.0
    for g, r in zip(got, ref):
        for k in r:
            total += float((g[k] - r[k]).pow(2).sum() / r[k].pow(2).sum().clamp(min=1e-12))
    return total / max(len(ref), 1)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, config: QuantConfig, batches: list[Tensor], widths: tuple[int, ...] = (8, 4)
) -> dict[str, dict[int, float]]:
    """Output error per target layer and weight width, that layer alone quantized (others float)."""
    targets = select_targets(model, config)
    ref = _outputs(model, batches)
    out: dict[str, dict[int, float]] = {}
    for i, (name, t) in enumerate(targets.items()):
        signs = random_signs(t.module.in_features, layer_seed(config.seed, name)).to(t.module.weight.device)
        out[name] = {16: 0.0}
        for w in widths:
            a = w if w > config.a_bits else config.a_bits  # activations as the kernels pair them: w8a8, w4a<a_bits>
            set_module(model, name, FakeQuantLinear(t.module, w, a, signs))
            try:
                out[name][w] = _error(_outputs(model, batches), ref)
            finally:
                set_module(model, name, t.module)
        log.debug("sensitivity %d/%d %s: %s", i + 1, len(targets), name, out[name])
    return out


@dataclass
class BitMap:
    """A chosen per-layer precision map and what it costs."""

    layer_bits: dict[str, tuple[int, int]]
    predicted_bytes: int
    fp16_bytes: int
    predicted_error: float
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def compression_vs_fp16(self) -> float:
        """fp16 bytes / predicted bytes."""
        return self.fp16_bytes / max(self.predicted_bytes, 1)

    def summary(self) -> dict[str, dict[str, int]]:
        """Layers per model part per weight width, e.g. ``{"aggregator": {"w4": 180, "w8": 12}}``."""
        out: dict[str, dict[str, int]] = {}
        for name, (w, _) in self.layer_bits.items():
            part = "aggregator.patch_embed" if name.startswith("aggregator.patch_embed") else name.split(".")[0]
            key = "float" if w >= 16 else f"w{w}"
            out.setdefault(part, {}).setdefault(key, 0)
            out[part][key] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the ``--layer-bits`` file format)."""
        return {
            "layer_bits": {k: list(v) for k, v in self.layer_bits.items()},
            "predicted_bytes": self.predicted_bytes,
            "fp16_bytes": self.fp16_bytes,
            "compression_vs_fp16": round(self.compression_vs_fp16, 4),
            "predicted_error": self.predicted_error,
            "summary": self.summary(),
        }


def choose_bits(
    model: nn.Module,
    config: QuantConfig,
    sensitivity: dict[str, dict[int, float]],
    budget: float | None = None,
    max_bytes: int | None = None,
) -> BitMap:
    """Greedy map: lower the cheapest layer (error per byte saved) until the model fits ``budget``/``max_bytes``."""
    if (budget is None) == (max_bytes is None):
        raise ValueError("give exactly one of budget (compression vs fp16, e.g. 3.5) or max_bytes")
    targets = select_targets(model, config)
    total16 = fp16_bytes(model)
    limit = int(max_bytes) if max_bytes is not None else int(total16 / float(budget))  # type: ignore[arg-type]
    if limit <= 0:
        raise ValueError(f"invalid budget: {budget or max_bytes}")
    conv_saving = sum(
        2 * c.weight.numel()
        + (2 * c.bias.numel() if c.bias is not None else 0)
        - conv_bytes(c, 8 if config.w_bits == 8 else 4)
        for c in select_convs(model, config).values()
    )
    bits = {n: 16 for n in targets}
    size = total16 - conv_saving
    error = 0.0
    while size > limit:
        best: tuple[float, str, int] | None = None
        for n, w in bits.items():
            nxt = WIDTHS[WIDTHS.index(w) + 1] if w != WIDTHS[-1] else None
            if nxt is None or nxt not in sensitivity.get(n, {}):
                continue
            saved = linear_bytes(targets[n].module, w) - linear_bytes(targets[n].module, nxt)
            cost = max(sensitivity[n][nxt] - sensitivity[n].get(w, 0.0), 0.0)
            if saved > 0 and (best is None or cost / saved < best[0]):
                best = (cost / saved, n, nxt)
        if best is None:
            raise BudgetUnreachableError(
                f"budget unreachable: with every layer in scope at its lowest width the model is {size:,} bytes "
                f"({total16 / size:.2f}x smaller than fp16), over the limit of {limit:,} bytes; widen the scope"
            )
        _, n, nxt = best
        error += max(sensitivity[n][nxt] - sensitivity[n].get(bits[n], 0.0), 0.0)
        size -= linear_bytes(targets[n].module, bits[n]) - linear_bytes(targets[n].module, nxt)
        bits[n] = nxt
    layer_bits = {n: (16, 16) if w >= 16 else (w, w if w > config.a_bits else config.a_bits) for n, w in bits.items()}
    return BitMap(layer_bits, size, total16, error, sensitivity)


def mixed_precision(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Tensor],
    budget: float | None = None,
    max_bytes: int | None = None,
) -> BitMap:
    """Measure sensitivity on ``calibration`` batches and choose a bit map for the budget."""
    from quantvggt.quant.calibrate import as_batch

    batches = [as_batch(b["images"] if isinstance(b, dict) else b) for b in calibration]
    if not batches:
        raise ValueError("mixed precision needs calibration images to measure sensitivity")
    was_training = model.training
    model.eval()
    try:
        sens = layer_sensitivity(model, config, batches)
    finally:
        model.train(was_training)
    return choose_bits(model, config, sens, budget=budget, max_bytes=max_bytes)


def read_layer_bits(path: str | Path) -> dict[str, tuple[int, int]]:
    """Read a ``--layer-bits`` file: a :meth:`BitMap.to_json` document, a name -> [w, a] map, or a checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "quant.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read layer bits ({e})") from e
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):  # a quantized checkpoint's quant.json
        doc = doc["config"]
    raw = doc.get("layer_bits", doc) if isinstance(doc, dict) else None
    if not isinstance(raw, dict) or not all(
        isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(b, int) for b in v) for v in raw.values()
    ):
        raise ValueError(f"{path}: expected {{layer name or pattern: [w_bits, a_bits]}}")
    return {k: (int(v[0]), int(v[1])) for k, v in raw.items()}

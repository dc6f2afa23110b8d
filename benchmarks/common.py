"""Shared benchmark helpers: timing and the reference approach (fake quantization with a dense rotation matmul)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import dense_rotation
from quantvggt.quant.linear import QuantLinear


def bench(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class ReferenceFakeQuantLinear(nn.Module):
    """The public QuantVGGT code's approach: a dense K x K rotation matmul per call, fake-quantized activations,
    and weights kept dequantized in float at rest."""

    def __init__(self, ql: QuantLinear) -> None:
        super().__init__()
        self.a_bits = ql.a_bits
        self.register_buffer("R", dense_rotation(ql.signs.float(), ql.plan).float() if ql.rotate else None)
        self.register_buffer("act_scale", ql.act_scale.clone())
        self.register_buffer("act_clip", ql.act_clip.clone())
        self.register_buffer("weight", ql.dequantized_weight())
        self.register_buffer("bias", None if ql.bias is None else ql.bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        """x @ R (dense), pre-scale, fake-quantize per token, float GEMM."""
        h = x.float()
        if self.R is not None:
            h = h @ self.R
        h = h * self.act_scale
        if self.a_bits < 16:
            s = qz.symmetric_scale(h.abs().amax(-1, keepdim=True) * self.act_clip, self.a_bits)
            h = torch.clamp(torch.round(h / s), -qz.qmax(self.a_bits) - 1, qz.qmax(self.a_bits)) * s
        return F.linear(h, self.weight, self.bias).to(x.dtype)


def to_reference(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear for the reference approach, in place."""
    for _name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                setattr(mod, cname, ReferenceFakeQuantLinear(child))
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

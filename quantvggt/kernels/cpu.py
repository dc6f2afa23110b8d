"""The CPU path for QuantLinear: Kronecker-factored Hadamard (small BLAS matmuls), fake-quantized activations,
and int4 weights unpacked per call (weights stay packed at rest; no int GEMM beats fp32 BLAS on AVX2 without VNNI).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from quantvggt.quant import quantizer as qz
from quantvggt.quant.hadamard import HadamardPlan, hadamard_transform


@functools.lru_cache(maxsize=16)
def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_kron(x: Tensor) -> Tensor:
    """Orthonormal Hadamard of the last dim (power of two) as ``H_a^T X H_b`` with ``K = a*b`` (two small matmuls)."""
    K = x.shape[-1]
    a = 1 << (int(math.log2(K)) // 2)
    b = K // a
    Ha, Hb = _sylvester(a).to(x), _sylvester(b).to(x)
    y = torch.matmul(Ha.T, x.reshape(-1, a, b))  # [M, a, b]
    y = torch.matmul(y, Hb)
    return y.reshape(x.shape) / math.sqrt(K)


def qlinear_forward(layer: torch.nn.Module, x: Tensor) -> Optional[Tensor]:
    """QuantLinear forward on CPU (same math as the fake-quant path, faster rotation)."""
    K = layer.in_features
    h = x.float().reshape(-1, K)
    if layer.rotate:
        s = layer.signs.to(h.dtype)
        h = hadamard_kron(h * s) if K & (K - 1) == 0 else hadamard_transform(h * s, layer.plan)
    h = h * layer.act_scale
    if layer.a_bits < 16:
        scale = qz.symmetric_scale(h.abs().amax(dim=-1, keepdim=True) * layer.act_clip, layer.a_bits)
        h = torch.clamp(torch.round(h / scale), -qz.qmax(layer.a_bits) - 1, qz.qmax(layer.a_bits)) * scale
    w = layer.int_weight().to(torch.float32) * layer.w_scale[:, None]  # transient: packed at rest
    y = F.linear(h, w, layer.bias)
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)

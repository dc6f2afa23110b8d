"""The CPU path for QuantLinear.

Activations: Kronecker-factored Hadamard (two small BLAS matmuls), pre-scale, per-token quantization.
GEMM: fbgemm's uint8 x int8 kernel with int32 accumulation, fed our integer levels exactly (activation scale 1,
zero point 2^(bits-1); weight levels with their per-channel scales), then the per-token scales and bias.
The int4 weights stay packed at rest and are unpacked + prepacked per call (about 10 ms for a 4096 x 1024 layer);
``QUANTVGGT_CPU_PREPACK_CACHE=1`` keeps the prepacked int8 weights instead (1 byte/weight) for lower latency.
W8A8 is excluded from fbgemm (AVX2's u8*s8 pair sums can saturate at 16 bits) and, like weight-only
layers, runs as float GEMM on dequantized weights.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import hadamard_transform

CACHE_ENV = "QUANTVGGT_CPU_PREPACK_CACHE"
MIN_TOKENS_FBGEMM = 256  # below this the per-call prepack costs more than it saves (measured, see docs/BENCHMARKS.md)


@functools.lru_cache(maxsize=16)
def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_kron(x: Tensor, normalize: bool = True) -> Tensor:
    """Hadamard of the last dim (power of two) as ``H_a^T X H_b`` with ``K = a*b`` (two small matmuls)."""
    K = x.shape[-1]
    a = 1 << (int(math.log2(K)) // 2)
    b = K // a
    Ha, Hb = _sylvester(a).to(x), _sylvester(b).to(x)
    y = torch.matmul(Ha.T, x.reshape(-1, a, b))  # [M, a, b]
    y = torch.matmul(y, Hb).reshape(x.shape)
    return y.mul_(1.0 / math.sqrt(K)) if normalize else y


def act_levels(layer: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rotate, pre-scale and quantize ``x [M, K]`` -> (float levels, per-token scale ``[M, 1]``) or (h, None) for A16."""
    K = layer.in_features
    h = x.float()
    if layer.rotate and K & (K - 1) == 0:
        # fewer passes over memory: unnormalised transform, 1/sqrt(K) folded into the pre-scale, in-place ops
        h = hadamard_kron(h * layer.signs.to(h.dtype), normalize=False).mul_(layer.act_scale * (1.0 / math.sqrt(K)))
    elif layer.rotate:
        h = hadamard_transform(h * layer.signs.to(h.dtype), layer.plan) * layer.act_scale
    else:
        h = h * layer.act_scale
    if layer.a_bits >= 16:
        return h, None
    amax = torch.linalg.vector_norm(h, ord=float("inf"), dim=-1, keepdim=True)
    scale = qz.symmetric_scale(amax * layer.act_clip, layer.a_bits)
    q = qz.qmax(layer.a_bits)
    return h.div_(scale).round_().clamp_(-q - 1, q), scale


def _fbgemm_ok(layer: torch.nn.Module) -> bool:
    return (
        layer.a_bits < 16
        and not (layer.a_bits == 8 and layer.w_bits == 8)
        and "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
    )


def _prepack(layer: torch.nn.Module) -> Any:
    cached = getattr(layer, "_fbgemm_packed", None)
    if cached is not None:
        return cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor constructors warn about a future deprecation
        wq = torch._make_per_channel_quantized_tensor(
            layer.int_weight().contiguous(),
            layer.w_scale.double(),
            torch.zeros(layer.out_features, dtype=torch.long),
            0,
        )
        packed = torch.ops.quantized.linear_prepack(wq, None)
    if os.environ.get(CACHE_ENV) == "1":
        layer._fbgemm_packed = packed
    return packed


def qlinear_forward(layer: torch.nn.Module, x: Tensor) -> Tensor | None:
    """QuantLinear forward on CPU (integer GEMM where exact, else float GEMM on transiently dequantized weights)."""
    K = layer.in_features
    levels, s = act_levels(layer, x.reshape(-1, K))
    cached = getattr(layer, "_fbgemm_packed", None) is not None
    if s is not None and _fbgemm_ok(layer) and (levels.shape[0] >= MIN_TOKENS_FBGEMM or cached):
        zp = 2 ** (layer.a_bits - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                levels.contiguous(), 1.0, zp, _prepack(layer)
            )
        y = y * s
        if layer.bias is not None:
            y = y + layer.bias
    else:
        h = levels if s is None else levels * s
        w = layer.int_weight().to(torch.float32) * layer.w_scale[:, None]  # transient: packed at rest
        y = F.linear(h, w, layer.bias)
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)

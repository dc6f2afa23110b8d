"""Symmetric integer quantizers, straight-through rounding, and int4 packing."""

from __future__ import annotations

import torch
from torch import Tensor


def qmax(bits: int) -> int:
    """Largest positive level of a signed ``bits``-bit integer (7 for 4-bit)."""
    return 2 ** (bits - 1) - 1


def round_ste(x: Tensor) -> Tensor:
    """Round with an identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


def symmetric_scale(amax: Tensor, bits: int) -> Tensor:
    """Scale mapping ``amax`` to the top level; tiny maxima are floored to avoid division by zero."""
    return amax.clamp(min=1e-8) / qmax(bits)


def quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer levels ``clamp(round(x / scale), -qmax-1, qmax)`` (returned in x's float dtype)."""
    return torch.clamp(torch.round(x / scale), -qmax(bits) - 1, qmax(bits))


def fake_quant_ste(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize with straight-through rounding (differentiable in ``x`` and ``scale``)."""
    return torch.clamp(round_ste(x / scale), -qmax(bits) - 1, qmax(bits)) * scale


def per_token_quant(x: Tensor, bits: int, clip: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token (last dim reduced) quantization -> (levels, scale ``[..., 1]``)."""
    scale = symmetric_scale(x.abs().amax(dim=-1, keepdim=True) * clip, bits)
    return quantize(x, scale, bits), scale


def per_channel_weight_quant(w: Tensor, bits: int, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel weight quantization -> (levels ``[out, in]``, scale ``[out]``)."""
    scale = symmetric_scale(w.abs().amax(dim=1) * clip, bits)
    return quantize(w, scale[:, None], bits), scale


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 levels ``[..., n]`` (n even, values in [-8, 7]) two per byte -> uint8 ``[..., n/2]``."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {q.shape[-1]}")
    q = q.to(torch.int16) & 0xF
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4` -> int8 levels ``[..., 2 * n]``."""
    p = p.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2).to(torch.int8)

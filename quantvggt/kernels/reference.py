"""Plain-torch references for the low-bit kernels (the ground truth the Triton and CPU paths are tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import HadamardPlan, rotate


def act_prep_ref(
    x: Tensor, signs: Tensor | None, act_scale: Tensor, act_clip: Tensor, bits: int
) -> tuple[Tensor, Tensor]:
    """Rotate (if ``signs``), pre-scale, per-token quantize: ``x [M, K]`` -> (int8 levels ``[M, K]``, scale ``[M]``)."""
    h = x.float()
    if signs is not None:
        h = rotate(h, signs.float())
    h = h * act_scale
    q, s = qz.per_token_quant(h, bits, act_clip)
    return q.to(torch.int8), s[:, 0]


def fused_prep_ref(
    x: Tensor,
    signs: Tensor | None,
    act_scale: Tensor,
    act_clip: Tensor,
    bits: int,
    plan: HadamardPlan | None = None,
    norm: tuple[Tensor | None, Tensor | None, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """[LayerNorm ``norm`` = (weight, bias, eps)] then :func:`act_prep_ref` with the rotation ``plan``."""
    h = x.float()
    if norm is not None:
        w, b, eps = norm
        h = F.layer_norm(h, (h.shape[-1],), None if w is None else w.float(), None if b is None else b.float(), eps)
    if signs is not None:
        h = rotate(h, signs.float(), plan)
    q, s = qz.per_token_quant(h * act_scale, bits, act_clip)
    return q.to(torch.int8), s[:, 0]


def w4_mma_layout_ref(packed: Tensor) -> Tensor:
    """Packed int4 bytes ``[N, K/2]`` -> int32 words ``[N, K/8]``: byte i of word g = k(8g+i) low, k(8g+i+4) high.

    Masking a word with ``0xF0F0F0F0`` leaves four int8 bytes equal to 16 x levels k(8g+4..8g+7) and
    ``(word << 4) & 0xF0F0F0F0`` four bytes equal to 16 x k(8g..8g+3): int8 MMA operands with no sign fix-up
    (the factor 16 is shifted out of the int32 accumulator).
    """
    lv = qz.unpack_int4(packed).to(torch.int64) & 0xF  # [N, K] nibbles
    n, k = lv.shape
    if k % 8:
        raise ValueError(f"the int4 MMA layout needs K divisible by 8, got {k}")
    g = lv.reshape(n, k // 8, 2, 4)  # [..., half, i]: half 0 = k 0..3 (low nibbles), half 1 = k 4..7 (high)
    shifts = (torch.arange(4) * 8)[None, None, None, :] + (torch.arange(2) * 4)[None, None, :, None]
    words = (g << shifts).sum(dim=(-2, -1))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def w4_mma_unpack_ref(words: Tensor) -> Tensor:
    """Inverse of :func:`w4_mma_layout_ref` -> int8 levels ``[N, K]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(4) * 8)[None, None, None, :] + (torch.arange(2) * 4)[None, None, :, None]
    nib = (w[:, :, None, None] >> shifts) & 0xF  # [N, K/8, 2, 4]
    return ((nib ^ 8) - 8).reshape(w.shape[0], -1).to(torch.int8)


def gemm_ref(q: Tensor, w: Tensor, a_scale: Tensor, w_scale: Tensor, bias: Tensor | None, packed: bool) -> Tensor:
    """``(q @ W^T)`` with exact integer accumulation, times per-token x per-channel scales, plus bias (fp32 out)."""
    wi = qz.unpack_int4(w) if packed else w
    acc = torch.matmul(q.double(), wi.double().T).to(torch.int32)
    y = acc.float() * a_scale[:, None] * w_scale[None, :]
    return y + bias if bias is not None else y

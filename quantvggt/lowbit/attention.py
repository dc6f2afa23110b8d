"""INT8 attention in the spirit of SageAttention, in plain torch: the reference the Triton kernel is tested against.

Q and K are quantized to int8 with one symmetric scale per block of tokens per head (Q: ``block_q`` tokens, K:
``block_k`` tokens, all ``D`` channels of the block share the scale). Before that, K is smoothed by subtracting its
mean over the tokens (per batch, head and channel). Smoothing leaves softmax unchanged — ``q·(k_j - m) = q·k_j - q·m``
and ``q·m`` is the same for every key ``j`` of a query row — but removes the component all keys share (from the qkv
and LayerNorm biases), which would otherwise set the int8 range of every K block.

Scores are ``S = (Q_int8 K_int8^T) * s_q * s_k * sm_scale``: the integer product is exact (int32 on a GPU; here an
fp32 matmul of integer-valued floats, exact because every partial sum is at most ``D * 128^2 < 2^24`` for
``D <= 1024``), and the softmax scale ``1/sqrt(D)`` is applied in the epilogue together with the dequantization
scales, not folded into Q before quantization (it would give the same levels anyway: symmetric quantization is
scale-invariant). Softmax is fp32. P·V is fp32 here; the Triton kernel rounds P and V to bf16 and accumulates in
fp32, so it matches this reference to bf16 rounding, not bit for bit.

Q and K must already carry QK-norm and RoPE (the model applies both before calling attention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quantvggt.lowbit.quantizer import quantize, symmetric_scale

ATTENTION_KINDS = ("sdpa", "int8")  # exact scaled-dot-product attention, or INT8 Q·K^T (this module)
BLOCK_Q = 128  # query tokens per int8 scale (SageAttention's granularity)
BLOCK_K = 64  # key tokens per int8 scale
_BITS = 8
_MAX_SCORE_ELEMENTS = 1 << 26  # the reference materialises scores for this many (query, key) pairs at a time


def check_attention_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`ATTENTION_KINDS`, else ``ValueError``."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    return kind


def k_mean(k: Tensor) -> Tensor:
    """Per-channel mean of K over its tokens: ``[..., N, D] -> [..., D]`` fp32 (what smoothing subtracts)."""
    return k.float().mean(dim=-2)


def quantize_per_block(x: Tensor, block: int, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 levels with one scale per ``block`` tokens (``mean`` subtracted first: K smoothing).

    ``x [..., N, D]``, ``mean [..., D]`` -> (int8 levels ``[..., N, D]``, fp32 scales ``[..., ceil(N / block)]``).
    """
    x = x.float()
    if mean is not None:
        x = x - mean.unsqueeze(-2)
    *lead, N, D = x.shape
    nb = math.ceil(N / block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - N))  # zeros never raise a block's amax
    amax = padded.reshape(*lead, nb, block * D).abs().amax(dim=-1)
    scale = symmetric_scale(amax, _BITS)  # [..., nb]
    per_token = scale.repeat_interleave(block, dim=-1)[..., :N]
    levels = quantize(x, per_token.unsqueeze(-1), _BITS)
    return levels.to(torch.int8), scale


def int8_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    sm_scale: float | None = None,
    smooth: bool = True,
) -> Tensor:
    """INT8 Q·K^T attention: q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` -> ``[B, H, Nq, D]`` in v's dtype.

    ``sm_scale`` defaults to ``1/sqrt(D)`` (as ``F.scaled_dot_product_attention``); ``smooth=False`` skips the K-mean
    subtraction (for ablations). Not differentiable in q and k (rounding); the model adds exact-attention gradients.
    """
    D = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q_lv, q_s = quantize_per_block(q, block_q)
    k_lv, k_s = quantize_per_block(k, block_k, k_mean(k) if smooth else None)
    Nq, Nk = q.shape[-2], k.shape[-2]
    q_tok = q_s.repeat_interleave(block_q, dim=-1)[..., :Nq] * sm_scale  # [B, H, Nq]
    k_tok = k_s.repeat_interleave(block_k, dim=-1)[..., :Nk]  # [B, H, Nk]
    k_f = k_lv.float().transpose(-1, -2)  # [B, H, D, Nk] integer-valued
    v_f = v.float()
    # query rows in chunks so that the scores of long sequences (many frames) stay within a few hundred MB
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, q.shape[0] * q.shape[1] * Nk))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for r0 in range(0, Nq, rows):
        r1 = min(Nq, r0 + rows)
        acc = q_lv[..., r0:r1, :].float() @ k_f  # exact integers (see module docstring)
        s = acc * q_tok[..., r0:r1, None] * k_tok[..., None, :]
        out[..., r0:r1, :] = torch.softmax(s, dim=-1) @ v_f
    return out.to(v.dtype)

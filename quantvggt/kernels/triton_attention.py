"""Triton INT8 attention (SageAttention-style): int8 Q·K^T with int32 accumulation, online softmax, bf16 P·V.

Two kernels: ``_quant_blocks_kernel`` quantizes Q or K to int8 with one scale per block of tokens (K smoothed by its
per-channel mean first), and ``_attn_fwd_kernel`` is a flash-attention loop over K/V blocks. The scales are written
per token, so the attention tiles need not match the quantization blocks (the autotuner picks the tiles). The
plain-torch reference is :func:`quantvggt.lowbit.attention.int8_attention_ref`; the quantization levels match it
exactly, the output to bf16 rounding of P and V.

Under ``TRITON_INTERPRET=1`` (CI, no GPU) the int8 ``tl.dot`` runs as on the GPU (the interpreter accumulates int8
products exactly in int32), but the interpreter's bf16 ``tl.dot`` is wrong and its bf16 casts truncate, so there P is
rounded to bf16 (round-to-nearest-even) with integer bit operations and multiplied with V in fp32: the same values
as the GPU's bf16 P·V with fp32 accumulation, in another summation order.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantvggt.kernels.triton_w4a4 import _round_half_even
from quantvggt.lowbit.attention import BLOCK_K, BLOCK_Q, k_mean

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # scores are kept in the log2 domain so that the softmax uses exp2


@triton.jit
def _quant_blocks_kernel(
    x_ptr,
    mean_ptr,
    q_ptr,
    s_ptr,
    N,
    D,
    SMOOTH: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # x [BH, N, D] -> q [BH, N, D] int8, s [BH, N] fp32 (one scale per BLOCK tokens, stored for each token)
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = bh * N * D + rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        m = tl.load(mean_ptr + bh * D + cols, mask=cols < D, other=0.0)
        x = tl.where(mask, x - m[None, :], 0.0)  # padding must stay 0 so that it never sets the block's amax
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    # IEEE division (div_rn): the GPU's default fp32 '/' is approximate and would move rounding ties off the reference
    scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
    q = _round_half_even(tl.math.div_rn(x, scale))
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + bh * N + rows, tl.zeros([BLOCK], dtype=tl.float32) + scale, mask=rows < N)


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    qs_ptr,
    k_ptr,
    ks_ptr,
    v_ptr,
    o_ptr,
    N_Q,
    N_K,
    D,
    qk_scale,
    N_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # q [BH, N_Q, D] int8 + qs [BH, N_Q]; k [BH, N_K, D] int8 + ks [BH, N_K]; v [BH, N_K, D] bf16 -> o [BH, N_Q, D]
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + bh * N_Q * D + rm[:, None] * D + rd[None, :], mask=(rm[:, None] < N_Q) & (rd[None, :] < D), other=0
    )
    # dequantization, 1/sqrt(D) and log2(e) in one factor per query row (the epilogue of the integer product)
    qs = tl.load(qs_ptr + bh * N_Q + rm, mask=rm < N_Q, other=0.0) * qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + bh * N_K * D
    v_base = v_ptr + bh * N_K * D
    for n0 in range(0, N_K, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(
            k_base + rn[None, :] * D + rd[:, None], mask=(rn[None, :] < N_K) & (rd[:, None] < D), other=0
        )  # [BLOCK_D, BLOCK_N] int8
        s = tl.dot(q, kt)  # int32, exact
        ks = tl.load(ks_ptr + bh * N_K + rn, mask=rn < N_K, other=0.0)
        s = s.to(tl.float32) * qs[:, None] * ks[None, :]
        s = tl.where(rn[None, :] < N_K, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < N_K) & (rd[None, :] < D), other=0.0)
        if EMULATE_BF16:  # interpreter: bf16 round-to-nearest-even of P by its bits, then an fp32 product (docstring)
            pb = p.to(tl.int32, bitcast=True)
            pb = (pb + 0x7FFF + ((pb >> 16) & 1)) & -65536
            pv = tl.dot(pb.to(tl.float32, bitcast=True), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(tl.bfloat16), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    if EMULATE_BF16 and OUT_BF16:  # the interpreter's bf16 store truncates: round to nearest even first
        ob = out.to(tl.int32, bitcast=True)
        out = ((ob + 0x7FFF + ((ob >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    o_offs = bh * N_Q * D + rm[:, None] * D + rd[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < N_Q) & (rd[None, :] < D))


def _attn_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (64, 64, 4, 3),
            (128, 64, 4, 4),
            (64, 128, 4, 3),
        ]
    ]


_attn_fwd_tuned = triton.autotune(configs=_attn_configs(), key=["N_BUCKET", "BLOCK_D"])(_attn_fwd_kernel)


def quantize_blocks(x: Tensor, block: int, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Int8 levels with one scale per ``block`` tokens, on the device (``mean`` subtracted first: K smoothing).

    ``x [BH, N, D]``, ``mean [BH, D]`` -> (int8 ``[BH, N, D]``, fp32 scales ``[BH, N]``: per token, equal within a
    block). The levels equal :func:`quantvggt.lowbit.attention.quantize_per_block`'s.
    """
    BH, N, D = x.shape
    x = x.contiguous()
    q = torch.empty((BH, N, D), dtype=torch.int8, device=x.device)
    s = torch.empty((BH, N), dtype=torch.float32, device=x.device)
    m = mean.float().contiguous() if mean is not None else s  # dummy pointer when not smoothing
    _quant_blocks_kernel[(triton.cdiv(N, block), BH)](
        x, m, q, s, N, D, SMOOTH=mean is not None, BLOCK=block, BLOCK_D=triton.next_power_of_2(D)
    )
    return q, s


def attend_quantized(
    q_lv: Tensor,
    q_s: Tensor,
    k_lv: Tensor,
    k_s: Tensor,
    v: Tensor,
    sm_scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """The attention kernel on quantized Q/K (:func:`quantize_blocks`' output) -> ``[BH, Nq, D]`` in v's dtype.

    ``q_lv [BH, Nq, D]`` int8 with ``q_s [BH, Nq]``, ``k_lv [BH, Nk, D]`` with ``k_s [BH, Nk]``, ``v [BH, Nk, D]``
    (rounded to bf16 for P·V); ``block_m``/``block_n`` fix the tiles instead of autotuning them.
    """
    BH, Nq, D = q_lv.shape
    Nk = k_lv.shape[1]
    vb = v.to(torch.bfloat16).contiguous()
    out = torch.empty((BH, Nq, D), dtype=v.dtype, device=q_lv.device)
    # int8 MMA needs a reduction of at least 32 (Hopper wgmma): smaller heads are zero-padded in registers
    block_d = max(32, triton.next_power_of_2(D))
    n_bucket = 1 << max(0, (max(Nq, Nk) - 1).bit_length())  # autotune per power-of-two length
    args = (q_lv, q_s, k_lv, k_s, vb, out, Nq, Nk, D, sm_scale * LOG2E, n_bucket)
    if block_m is not None or block_n is not None:
        bm, bn = block_m or 16, block_n or 16
        _attn_fwd_kernel[(triton.cdiv(Nq, bm), BH)](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, EMULATE_BF16=INTERPRET, OUT_BF16=v.dtype == torch.bfloat16
        )
    else:

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(Nq, meta["BLOCK_M"]), BH)

        _attn_fwd_tuned[grid](*args, BLOCK_D=block_d, EMULATE_BF16=INTERPRET, OUT_BF16=v.dtype == torch.bfloat16)
    return out


def int8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    sm_scale: float | None = None,
    smooth: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """INT8 Q·K^T attention: q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` -> ``[B, H, Nq, D]`` in v's dtype.

    ``block_q``/``block_k`` set the quantization granularity (as the reference); ``block_m``/``block_n`` fix the
    attention tiles instead of autotuning them. V is rounded to bf16 for P·V (fp32 accumulation).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if D > 1024:  # the int32 products stay exact, but the reference's fp32 emulation would not (and no model needs it)
        raise ValueError(f"head dim {D} > 1024 is not supported")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q_lv, q_s = quantize_blocks(q.reshape(B * H, Nq, D), block_q)
    mean = k_mean(k).reshape(B * H, D) if smooth else None  # the reference's own mean: identical smoothed values
    k_lv, k_s = quantize_blocks(k.reshape(B * H, Nk, D), block_k, mean)
    out = attend_quantized(q_lv, q_s, k_lv, k_s, v.reshape(B * H, Nk, D), sm_scale, block_m, block_n)
    return out.reshape(B, H, Nq, D)


def attention_forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """The registry's ``attention_int8`` on CUDA: the kernel at the default blocks, ``None`` for unsupported shapes."""
    if q.shape[-1] > 1024 or q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        return None
    return int8_attention(q, k, v)

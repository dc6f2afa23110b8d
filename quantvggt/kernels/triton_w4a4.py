"""Triton kernels: fused rotate-smooth-quantize of activations, and an int4/int8 weight GEMM with int32 accumulation.

Each has a plain-torch reference in :mod:`quantvggt.kernels.reference`. Under ``TRITON_INTERPRET=1`` (CI, no GPU)
loads are cast to fp32 and the kernels run on CPU tensors.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantvggt.kernels.triton_common import _round_half_even
from quantvggt.lowbit.registry import TRITON_QLINEAR_ENV

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _act_prep_kernel(
    x_ptr,
    signs_ptr,
    ascale_ptr,
    q_ptr,
    s_ptr,
    M,
    clip,
    sqrt_k,
    K: tl.constexpr,
    LOG2K: tl.constexpr,
    ROTATE: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # x [M, K] -> q [M, K] int8, s [M] fp32 ; one program handles BLOCK_M full rows
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, K)
    mask = rows[:, None] < M
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        sg = tl.load(signs_ptr + cols).to(tl.float32)
        x = x * sg[None, :]
        for st in tl.static_range(LOG2K):  # Walsh-Hadamard butterflies of half-width 1 << st = 1, 2, 4, ...
            # (shapes written inline: a constexpr name cannot be re-bound inside a static loop on real GPUs)
            y = tl.reshape(x, (BLOCK_M, K // (2 << st), 2, 1 << st))
            y = tl.permute(y, (0, 1, 3, 2))
            a, b = tl.split(y)
            y = tl.join(a + b, a - b)
            y = tl.permute(y, (0, 1, 3, 2))
            x = tl.reshape(y, (BLOCK_M, K))
        x = x / sqrt_k
    x = x * tl.load(ascale_ptr + cols).to(tl.float32)[None, :]
    amax = tl.max(tl.abs(x), axis=1) * clip
    scale = tl.maximum(amax, 1e-8) / QMAX
    q = _round_half_even(x / scale[:, None])
    q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < M)


def act_prep(
    x: Tensor, signs: Tensor | None, act_scale: Tensor, act_clip: float, bits: int, block_m: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fused Hadamard rotation (power-of-two widths) + pre-scale + per-token quantization -> (int8 [M,K], fp32 [M])."""
    M, K = x.shape
    if block_m is None:
        block_m = 16 if INTERPRET else max(1, 4096 // K)  # keep a program's row tile within the register file
    if K & (K - 1):
        raise ValueError(f"the Triton activation kernel needs a power-of-two width, got {K}")
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    sg = signs if signs is not None else act_scale  # dummy pointer when not rotating
    grid = (triton.cdiv(M, block_m),)
    _act_prep_kernel[grid](
        x.contiguous(),
        sg.contiguous(),
        act_scale.contiguous().float(),
        q,
        s,
        M,
        float(act_clip),
        math.sqrt(K),
        K=K,
        LOG2K=int(math.log2(K)),
        ROTATE=signs is not None,
        QMAX=2 ** (bits - 1) - 1,
        BLOCK_M=block_m,
    )
    return q, s


def _gemm_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 128, 8, 3),
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (64, 128, 128, 4, 4),
            (128, 64, 128, 4, 4),
            (64, 64, 128, 4, 3),
        ]
    ]


@triton.jit
def _epilogue(acc, rm, rn, M, N, as_ptr, ws_ptr, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr):
    # int32 tile acc [BLOCK_M, BLOCK_N] -> out = acc * a_scale[m] * w_scale[n] (+ bias[n]), both GEMM kernels
    a_s = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
    w_s = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    optr = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    if OUT_BF16:
        tl.store(optr, y.to(tl.bfloat16), mask=omask)
    else:
        tl.store(optr, y, mask=omask)


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _gemm_kernel(
    a_ptr,
    w_ptr,
    as_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    # a [M, K] int8, w [N, K/2] uint8 (two int4 per byte, low nibble = even k) or [N, K] int8 -> out [M, N]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        if PACKED:
            rkh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(
                w_ptr + rn[:, None] * (K // 2) + rkh[None, :], mask=(rn[:, None] < N) & (rkh[None, :] < K // 2), other=0
            )
            p = p.to(tl.int32)
            lo = ((p & 0xF) ^ 8) - 8
            hi = (((p >> 4) & 0xF) ^ 8) - 8
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(
                tl.int8
            )  # unpack in registers (no int4 MMA on Hopper)
        else:
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        if CAST_F32:  # interpreter: exact integer products in fp32 (|sum| < 2^24 for these tile sizes)
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32))).to(tl.int32)
        else:
            acc += tl.dot(a, tl.trans(w))
    _epilogue(acc, rm, rn, M, N, as_ptr, ws_ptr, bias_ptr, out_ptr, HAS_BIAS, OUT_BF16)


def gemm(
    q: Tensor,
    w: Tensor,
    a_scale: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    packed: bool,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Quantized activations x (packed int4 | int8) weights with int32 accumulation and a scale/bias epilogue."""
    return _launch(_gemm_kernel, q, w, a_scale, w_scale, bias, out_dtype, PACKED=packed)


def _launch(
    kernel: Any,
    q: Tensor,
    w: Tensor,
    a_scale: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    **constexprs: Any,
) -> Tensor:
    """Run one of the GEMM kernels: ``q [M, K]`` x weights with rows ``[N, ...]`` -> ``out [M, N]``."""
    M, K = q.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=q.device)
    bucket = 1 << max(0, (M - 1).bit_length())  # autotune per power-of-two M bucket

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    kernel[grid](
        q.contiguous(),
        w.contiguous(),
        a_scale.contiguous().float(),
        w_scale.contiguous().float(),
        bias.float().contiguous() if bias is not None else w_scale,
        out,
        M,
        N,
        K,
        bucket,
        HAS_BIAS=bias is not None,
        OUT_BF16=out_dtype == torch.bfloat16,
        CAST_F32=INTERPRET,
        **constexprs,
    )
    return out


# Candidate tiles per VGGT-1B aggregator shape (N, K) at M ~ 13740 tokens (10 frames): wide-N layers get wide-N tiles,
# the K = 4096 fc2 long-K tiles. Autotuning benchmarks only these for a known shape (key: M bucket, N, K), all
# generic configs otherwise; benchmarks/gpu_w4a4.py prints the winner per shape so it can be pinned here.
W4_SHAPE_TILES: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {
    (3072, 1024): [(128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)],  # qkv
    (1024, 1024): [(128, 128, 64, 4, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3)],  # proj
    (4096, 1024): [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4)],  # fc1
    (1024, 4096): [(128, 128, 128, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 64, 4, 4)],  # fc2
}


def _mma_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    tiles = sorted({t for ts in W4_SHAPE_TILES.values() for t in ts} | {(64, 64, 128, 4, 3)})
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in tiles
    ]


def _prune_for_shape(configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep the tiles listed for this (N, K) in :data:`W4_SHAPE_TILES`; every config for other shapes."""
    want = W4_SHAPE_TILES.get((int(named_args["N"]), int(named_args["K"])))
    if not want:
        return configs
    kept = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in want
    ]
    return kept or configs


@triton.autotune(
    configs=_mma_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_for_shape}
)
@triton.jit
def _gemm_w4mma_kernel(
    a_ptr,
    w_ptr,
    as_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    # a [M, K] int8, w [N, K/8] int32 words (reference.w4_mma_layout_ref) -> out [M, N]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sh = tl.arange(0, 4) * 8  # byte offsets inside a word
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0
        )
        rkw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        t = tl.load(
            w_ptr + rn[:, None] * (K // 8) + rkw[None, :], mask=(rn[:, None] < N) & (rkw[None, :] < K // 8), other=0
        )  # [BLOCK_N, BLOCK_K / 8]: one 32-bit load = eight int4 levels
        # -252645136 = 0xF0F0F0F0: keep the high nibble of every byte, so each byte *is* the int8 16 x level
        hi = t & -252645136  # bytes: 16 * k(8g + 4 + i)
        lo = (t << 4) & -252645136  # bytes: 16 * k(8g + i)
        lo_b = (lo[:, :, None] >> sh[None, None, :]).to(tl.int8)  # [BLOCK_N, BLOCK_K / 8, 4] (truncation = byte)
        hi_b = (hi[:, :, None] >> sh[None, None, :]).to(tl.int8)
        w = tl.reshape(tl.permute(tl.join(lo_b, hi_b), (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))  # k = 8g + 4 half + i
        if CAST_F32:  # interpreter: exact integer products in fp32 (|tile sum| <= 32 * 128 * 128 < 2^24)
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32))).to(tl.int32)
        else:
            acc += tl.dot(a, tl.trans(w))
    acc = acc >> 4  # every product carried a factor 16: exact arithmetic shift
    _epilogue(acc, rm, rn, M, N, as_ptr, ws_ptr, bias_ptr, out_ptr, HAS_BIAS, OUT_BF16)


def w4_mma_layout(packed: Tensor) -> Tensor:
    """Packed int4 bytes ``[N, K/2]`` -> int32 words ``[N, K/8]`` for :func:`gemm_w4mma` (on ``packed``'s device).

    Byte i of word g holds level k(8g+i) in its low nibble and k(8g+i+4) in its high nibble
    (see :func:`quantvggt.kernels.reference.w4_mma_layout_ref`, which this matches bit for bit).
    """
    n, kh = packed.shape
    if (2 * kh) % 8:
        raise ValueError(f"the int4 MMA layout needs K divisible by 8, got {2 * kh}")
    p = packed.to(torch.int32).reshape(n, kh // 4, 4)  # 4 bytes = levels k(8g..8g+7), two per byte, low nibble even
    lo, hi = p & 0xF, (p >> 4) & 0xF  # lo[..., j] = k(8g+2j), hi[..., j] = k(8g+2j+1)
    nib = torch.stack((lo, hi), dim=-1).reshape(n, kh // 4, 8)  # natural order k(8g..8g+7)
    byte = nib[..., :4] | (nib[..., 4:] << 4)  # byte i: k(8g+i) | k(8g+i+4) << 4, values 0..255
    word = byte[..., 0] | (byte[..., 1] << 8) | (byte[..., 2] << 16) | (byte[..., 3].to(torch.int64) << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


def gemm_w4mma(
    q: Tensor,
    words: Tensor,
    a_scale: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`gemm` for int4 weights in the :func:`w4_mma_layout` words; bit-identical outputs."""
    if words.shape[1] * 8 != q.shape[1]:
        raise ValueError(f"weight words {tuple(words.shape)} do not match K = {q.shape[1]}")
    return _launch(_gemm_w4mma_kernel, q, words, a_scale, w_scale, bias, out_dtype)


PATH_ENV = TRITON_QLINEAR_ENV  # "fused" (default: fused prep + MMA-layout GEMM) or "split" (previous path)


def prepared_words(layer: torch.nn.Module) -> Tensor:
    """The layer's int4 weights in :func:`w4_mma_layout`, computed once per weight tensor and cached on the layer.

    The checkpoint keeps ``qweight`` (int4 at rest); the cache is keyed on its storage, so ``set_weight`` or a
    device move recomputes it. Costs K x N / 2 extra bytes per layer (the packed int4 once more).
    """
    key = (layer.qweight.data_ptr(), layer.qweight.device)
    cached = layer.__dict__.get("_w4_mma")
    if cached is None or cached[0] != key:
        cached = (key, w4_mma_layout(layer.qweight))
        layer.__dict__["_w4_mma"] = cached  # plain attribute: not a buffer, so the state dict is unchanged
    return cached[1]


def prepare_model_(model: torch.nn.Module) -> int:
    """Compute the MMA weight layout of every 4-bit QuantLinear now (at load) instead of on first call; -> count."""
    n = 0
    for m in model.modules():
        is_qlinear = hasattr(m, "qweight") and hasattr(m, "a_bits")  # QuantLinear (no import of quant/ here)
        if is_qlinear and m.w_bits == 4 and m.in_features % 8 == 0:
            prepared_words(m)
            n += 1
    return n


def qlinear_forward(layer: torch.nn.Module, x: Tensor) -> Tensor | None:
    """QuantLinear forward on CUDA with Triton kernels; ``None`` when the layer is not supported (torch path).

    Default path: the fused input kernel (:mod:`.triton_prep`, with the preceding LayerNorm when
    :func:`~quantvggt.kernels.triton_prep.fuse_norms_` attached one) and, for int4 weights, the MMA-layout GEMM.
    ``QUANTVGGT_TRITON_QLINEAR=split`` selects the previous act_prep + packed GEMM (kept for A/B timings).
    """
    from quantvggt.kernels import triton_prep as tp

    K = layer.in_features
    norm = tp.attached_norm(layer)
    if os.environ.get(PATH_ENV, "fused") == "split" and layer.a_bits < 16 and not (K & (K - 1)) and K % 64 == 0:
        x2 = x.reshape(-1, K)
        if norm is not None:  # unfused: LayerNorm as its own kernel, as before fuse_norms_
            x2 = torch.nn.functional.layer_norm(x2, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        q, s = act_prep(x2, layer.signs if layer.rotate else None, layer.act_scale, float(layer.act_clip), layer.a_bits)
        y = gemm(
            q,
            layer.qweight,
            s,
            layer.w_scale,
            layer.bias,
            packed=layer.w_bits == 4,
            out_dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32,
        )
        return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
    # (a split-path layer the split kernels cannot take runs the fused path: with an attached norm, returning None
    # would run the torch path without the norm)
    if not tp.supports(layer) or K % 8:
        return None
    shape = x.shape
    q, s = tp.fused_prep(
        x.reshape(-1, K),
        layer.signs if layer.rotate else None,
        layer.act_scale,
        float(layer.act_clip),
        layer.a_bits,
        block=tp.rotation_block(layer) or None,
        norm=None if norm is None else (norm.weight, norm.bias, norm.eps),
    )
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    if layer.w_bits == 4:
        y = gemm_w4mma(q, prepared_words(layer), s, layer.w_scale, layer.bias, out_dtype=out_dtype)
    else:
        y = gemm(q, layer.qweight, s, layer.w_scale, layer.bias, packed=False, out_dtype=out_dtype)
    return y.reshape(*shape[:-1], layer.out_features).to(x.dtype)

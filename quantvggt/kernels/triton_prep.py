"""Fused Triton input preparation for a quantized linear: [LayerNorm] -> Hadamard rotation -> smoothing -> quantize.

One program owns ``BLOCK_M`` full rows, so every activation is read from global memory once and the int8 levels and
the per-token fp32 scale are written once (the unfused path reads ``x`` in LayerNorm, writes it, reads it again in the
rotation/quantization kernel). The order of operations is :meth:`quantvggt.quant.linear.QuantLinear.quantize_input`'s:
rotation ``R = diag(signs) H / sqrt(b)`` first, then ``act_scale`` (= 1 / smoothing, which lives in the rotated basis),
then symmetric per-token quantization clipped by ``act_clip``.

Widths: power-of-two (full FWHT) and block-diagonal plans (FWHT over power-of-two blocks; a non-power-of-two row is
zero-padded to the next power of two inside the program, the padding forming its own blocks). Paley plans
(96, 384, 768, ...) are not fused: :func:`supports` says so and the caller runs the torch path.

``fuse_norms_`` wires the LayerNorm option into a model: on CUDA, a Block's ``norm1``/``norm2`` becomes a pass-through
and the following quantized ``qkv``/``fc1`` applies it inside this kernel (state-dict keys unchanged).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from quantvggt.kernels.triton_common import _round_half_even
from quantvggt.lowbit.registry import QLINEAR_BACKEND_ENV

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fused_prep_kernel(
    x_ptr,
    lnw_ptr,
    lnb_ptr,
    signs_ptr,
    ascale_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    eps,
    clip,
    sqrt_b,
    KP: tl.constexpr,
    LOG2B: tl.constexpr,
    NORM: tl.constexpr,
    LN_AFFINE: tl.constexpr,
    ROTATE: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # x [M, K] (any float) -> q [M, K] int8, s [M] fp32; KP = next power of two >= K (register tile width)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, KP)
    cmask = cols < K
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]  # int64: 200 frames x 4096 channels nears 2^31
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # two-pass mean/variance in fp32 (biased variance, as nn.LayerNorm)
        mean = tl.sum(x, axis=1) / K
        d = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / K
        x = d * tl.rsqrt(var + eps)[:, None]
        if LN_AFFINE:
            w = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            x = x * w[None, :] + b[None, :]
    if ROTATE:
        sg = tl.load(signs_ptr + cols, mask=cmask, other=0).to(tl.float32)
        x = x * sg[None, :]  # padded columns become 0 here even after an LN bias
        # the first LOG2B butterfly stages of a width-KP FWHT = independent FWHTs over blocks of 2^LOG2B columns
        for st in tl.static_range(LOG2B):
            y = tl.reshape(x, (BLOCK_M, KP // (2 << st), 2, 1 << st))
            y = tl.permute(y, (0, 1, 3, 2))
            a, b2 = tl.split(y)
            y = tl.join(a + b2, a - b2)
            y = tl.permute(y, (0, 1, 3, 2))
            x = tl.reshape(y, (BLOCK_M, KP))
        x = x / sqrt_b  # division, not a reciprocal multiply: the torch reference divides (bit-equal levels)
    x = x * tl.load(ascale_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    amax = tl.max(tl.abs(x), axis=1) * clip
    scale = tl.maximum(amax, 1e-8) / QMAX
    q = _round_half_even(x / scale[:, None])
    q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < M)


def rotation_block(layer: nn.Module) -> int | None:
    """FWHT block width the fused kernel uses for ``layer`` (0: no rotation), ``None`` when it cannot fuse it."""
    if not layer.rotate:
        return 0
    plan = layer.plan
    if plan.kind == "pow2":
        return plan.n
    if plan.kind == "blockdiag":
        return plan.block
    return None  # Paley: a dense K x K factor, not a butterfly network


def supports(layer: nn.Module) -> bool:
    """Whether :func:`fused_prep` can prepare ``layer``'s input (quantized activations, non-Paley rotation)."""
    return layer.a_bits < 16 and rotation_block(layer) is not None


def fused_prep(
    x: Tensor,
    signs: Tensor | None,
    act_scale: Tensor,
    act_clip: float,
    bits: int,
    block: int | None = None,
    norm: tuple[Tensor | None, Tensor | None, float] | None = None,
    block_m: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` -> (int8 levels ``[M, K]``, fp32 per-token scale ``[M]``), reading ``x`` once.

    ``norm`` = (weight, bias, eps) applies a LayerNorm first; ``signs`` rotates with FWHT blocks of ``block``
    columns (default: all ``K``, which must then be a power of two).
    """
    M, K = x.shape
    KP = 1 << max(0, (K - 1).bit_length())
    block = K if block is None else block
    if signs is not None and (block & (block - 1) or K % block):
        raise ValueError(f"FWHT block {block} must be a power of two dividing the width {K}")
    if block_m is None:
        block_m = 16 if INTERPRET else max(1, 4096 // KP)  # keep a program's row tile within the register file
    x = x.contiguous()
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    ascale = act_scale.contiguous().float()
    lnw, lnb, eps = norm if norm is not None else (None, None, 0.0)
    if lnw is not None and lnb is None:
        lnb = torch.zeros_like(lnw)
    dummy = ascale  # never read: the constexpr switches compile those loads out
    _fused_prep_kernel[(triton.cdiv(M, block_m),)](
        x,
        lnw.contiguous() if lnw is not None else dummy,
        lnb.contiguous() if lnb is not None else dummy,
        signs.contiguous() if signs is not None else dummy,
        ascale,
        q,
        s,
        M,
        K,
        float(eps),
        float(act_clip),
        math.sqrt(block),
        KP=KP,
        LOG2B=int(math.log2(block)) if signs is not None else 0,
        NORM=norm is not None,
        LN_AFFINE=lnw is not None,
        ROTATE=signs is not None,
        QMAX=2 ** (bits - 1) - 1,
        BLOCK_M=block_m,
    )
    return q, s


# -- LayerNorm fusion into the model -----------------------------------------------------------------------------------
class DeferredLayerNorm(nn.LayerNorm):
    """A LayerNorm that passes CUDA inputs through: its quantized consumer applies it inside :func:`fused_prep`.

    Only :func:`fuse_norms_` creates these (by swapping the class of a Block's norm in place: same parameters, same
    state-dict keys); on any other device it is a plain LayerNorm, matching the torch paths of ``QuantLinear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Identity on CUDA (the consumer normalises), LayerNorm elsewhere."""
        return x if x.is_cuda else F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def attached_norm(layer: nn.Module) -> nn.LayerNorm | None:
    """The LayerNorm :func:`fuse_norms_` attached to ``layer`` (applied in its fused input kernel), or ``None``."""
    return layer.__dict__.get("_prenorm")


def _fusable(norm: nn.Module, layer: nn.Module) -> bool:
    # a packed QuantLinear, recognised by its buffers: kernels/ never imports quant/ (tests/test_layout.py)
    return (
        type(norm) is nn.LayerNorm
        and len(norm.normalized_shape) == 1
        and "qweight" in getattr(layer, "_buffers", {})  # may be None: freed while the CPU kernel holds the weights
        and hasattr(layer, "a_bits")
        and supports(layer)
        and layer.in_features % 8 == 0
        # "auto" is the only path that calls the fused kernel
        and os.environ.get(QLINEAR_BACKEND_ENV, getattr(layer, "backend", "auto")) == "auto"
    )


def fuse_norms_(model: nn.Module) -> int:
    """Fold every transformer Block's ``norm1``/``norm2`` into its quantized ``attn.qkv``/``mlp.fc1`` (CUDA); -> count.

    Call after loading and moving the model, before ``compile_``. The CUDA forward then reads each block input once
    (LayerNorm, rotation, smoothing and quantization in one kernel) instead of writing and re-reading the normalised
    activations. Requires the ``auto`` QuantLinear backend; :func:`unfuse_norms_` undoes it.
    """
    from quantvggt.model.layers import Block

    n = 0
    for block in model.modules():
        if not isinstance(block, Block):
            continue
        for norm, layer in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
            if _fusable(norm, layer):
                norm.__class__ = DeferredLayerNorm
                layer.__dict__["_prenorm"] = norm  # plain attribute: not a submodule, state dict unchanged
                n += 1
    return n


def unfuse_norms_(model: nn.Module) -> int:
    """Undo :func:`fuse_norms_`; -> number of norms restored."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop("_prenorm", None) is not None:
            n += 1
        if type(m) is DeferredLayerNorm:
            m.__class__ = nn.LayerNorm
    return n

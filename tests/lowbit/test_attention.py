"""The plain-torch INT8 attention reference: accuracy vs exact attention, K smoothing, per-block scales."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quantvggt.lowbit import attention as at


def _qkv(B: int = 1, H: int = 4, N: int = 300, D: int = 64, offset: float = 0.0, seed: int = 0) -> tuple:
    """LayerNorm'd q and k (as VGGT's QK-norm makes them), k optionally with a shared per-channel offset."""
    g = torch.Generator().manual_seed(seed)
    q = F.layer_norm(torch.randn(B, H, N, D, generator=g), (D,))
    k = F.layer_norm(torch.randn(B, H, N, D, generator=g), (D,)) + offset * torch.randn(D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_reference_close_to_exact_sdpa() -> None:
    # int8 per-block Q/K: 2% relative (Frobenius) error of the output on unit-scale (QK-normed) inputs; the error of
    # plain bf16 SDPA on the same inputs is ~0.4%, so int8 Q·K^T is the larger of the two
    q, k, v = _qkv()
    exact = F.scaled_dot_product_attention(q, k, v)
    out = at.int8_attention_ref(q, k, v)
    assert out.shape == exact.shape and out.dtype == v.dtype
    assert _rel(out, exact) < 0.02


def test_k_smoothing_leaves_softmax_unchanged_and_reduces_error() -> None:
    q, k, v = _qkv(offset=5.0)
    exact = F.scaled_dot_product_attention(q, k, v)
    smoothed = k - at.k_mean(k).unsqueeze(-2)
    # exact attention is invariant to subtracting a per-channel constant from K (q·m is constant per query row)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, smoothed, v), exact, rtol=1e-5, atol=1e-5)
    err_smooth = _rel(at.int8_attention_ref(q, k, v), exact)
    err_plain = _rel(at.int8_attention_ref(q, k, v, smooth=False), exact)
    assert err_smooth < 0.02
    assert err_smooth < 0.6 * err_plain  # the shared offset no longer sets the int8 range of K
    # smoothing makes the int8 result (nearly) independent of such an offset
    shifted = at.int8_attention_ref(q, k + 3.0, v)
    assert _rel(shifted, at.int8_attention_ref(q, k, v)) < 5e-3


def test_per_block_scales() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 70, 16, generator=g)
    x[0, 1, 40, 3] = 50.0  # an outlier sets only its own block's scale
    levels, scale = at.quantize_per_block(x, 32)
    assert levels.dtype == torch.int8 and levels.shape == x.shape
    assert scale.shape == (2, 3, 3)  # ceil(70 / 32) blocks per head
    for b in range(3):
        blk = x[..., 32 * b : 32 * (b + 1), :]
        torch.testing.assert_close(scale[..., b], blk.abs().amax(dim=(-1, -2)) / 127, rtol=0, atol=0)
    assert scale[0, 1, 1] == pytest.approx(50.0 / 127)
    assert scale[0, 1, 0] < 0.1 and scale[0, 1, 2] < 0.1
    per_token = scale.repeat_interleave(32, dim=-1)[..., :70, None]
    assert (levels.float() * per_token - x).abs().le(per_token / 2 + 1e-6).all()  # rounding error <= half a step
    assert levels.abs().max() <= 127


def test_scores_are_the_exact_integer_product_times_scales() -> None:
    q, k, v = _qkv(N=50, D=32)
    bq, bk = 16, 8
    q_lv, q_s = at.quantize_per_block(q, bq)
    k_lv, k_s = at.quantize_per_block(k, bk, at.k_mean(k))
    acc = q_lv.double() @ k_lv.double().transpose(-1, -2)  # exact in float64
    s = (
        acc
        * q_s.double().repeat_interleave(bq, -1)[..., :50, None]
        * k_s.double().repeat_interleave(bk, -1)[..., None, :50]
        / math.sqrt(32)
    )
    want = torch.softmax(s, -1) @ v.double()
    torch.testing.assert_close(at.int8_attention_ref(q, k, v, bq, bk), want.float(), rtol=1e-5, atol=1e-6)


def test_chunked_queries_and_cross_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(N=90, D=32)
    q = q[..., :61, :]  # fewer queries than keys
    whole = at.int8_attention_ref(q, k, v, 16, 16)
    monkeypatch.setattr(at, "_MAX_SCORE_ELEMENTS", 4 * 90 * 7)  # 7 query rows at a time
    torch.testing.assert_close(at.int8_attention_ref(q, k, v, 16, 16), whole, rtol=0, atol=0)


def test_sm_scale_and_dtype() -> None:
    q, k, v = _qkv(N=40, D=32)
    torch.testing.assert_close(
        at.int8_attention_ref(q, k, v, sm_scale=1 / math.sqrt(32)), at.int8_attention_ref(q, k, v)
    )
    out = at.int8_attention_ref(q, k, v.bfloat16())
    assert out.dtype == torch.bfloat16


def test_attention_kind_is_checked() -> None:
    assert at.check_attention_kind("int8") == "int8"
    with pytest.raises(ValueError, match="attention must be one of"):
        at.check_attention_kind("fp8")

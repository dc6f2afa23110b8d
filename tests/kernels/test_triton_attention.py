"""The Triton INT8 attention kernels vs the plain-torch reference (interpreter on CPU, real kernels on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from quantvggt.kernels import triton_attention as ta  # noqa: E402  (after TRITON_INTERPRET / sys.path set-up above)
from quantvggt.lowbit import attention as at  # noqa: E402  (after TRITON_INTERPRET / sys.path set-up above)

if not ta.INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEV = "cpu" if ta.INTERPRET else "cuda"  # the interpreter runs on host tensors; real kernels on the GPU


def _qkv(B: int, H: int, N: int, D: int, sharp: float = 2.0, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = F.layer_norm(torch.randn(B, H, N, D, generator=g), (D,)) * sharp  # sharp: peaked attention, larger errors
    k = F.layer_norm(torch.randn(B, H, N, D, generator=g), (D,)) + 2.0 * torch.randn(D, generator=g)
    v = torch.randn(B, H, N, D, generator=g).bfloat16().float()  # bf16 values: the kernel's V rounding is a no-op
    return q, k, v


@pytest.mark.parametrize("N,D,block,smooth", [(37, 32, 16, True), (70, 24, 32, True), (50, 64, 16, False)])
def test_quantize_blocks_matches_reference_exactly(N: int, D: int, block: int, smooth: bool) -> None:
    _, k, _ = _qkv(2, 3, N, D)
    mean = at.k_mean(k) if smooth else None
    lv_ref, s_ref = at.quantize_per_block(k, block, mean)
    lv, s = ta.quantize_blocks(k.reshape(6, N, D).to(DEV), block, None if mean is None else mean.reshape(6, D).to(DEV))
    assert lv.dtype == torch.int8
    assert torch.equal(lv.cpu(), lv_ref.reshape(6, N, D))
    assert torch.equal(s.cpu(), s_ref.repeat_interleave(block, -1)[..., :N].reshape(6, N))


# (B, H, N, D, quantization blocks q/k, tiles m/n): N not a multiple of any block, several heads, small and
# non-power-of-two heads (zero-padded to the int8 MMA's 32), quantization blocks different from the tiles
CASES = [
    (1, 2, 37, 32, 16, 16, 16, 16),
    (2, 3, 50, 16, 32, 16, 16, 16),
    (1, 2, 45, 24, 16, 16, 16, 32),
    (1, 1, 33, 64, 32, 32, 16, 16),
]


@pytest.mark.parametrize("B,H,N,D,bq,bk,bm,bn", CASES)
def test_kernel_matches_reference(B: int, H: int, N: int, D: int, bq: int, bk: int, bm: int, bn: int) -> None:
    q, k, v = _qkv(B, H, N, D)
    ref = at.int8_attention_ref(q, k, v, bq, bk)
    out = ta.int8_attention(q.to(DEV), k.to(DEV), v.to(DEV), bq, bk, block_m=bm, block_n=bn).cpu()
    assert out.shape == ref.shape and out.dtype == torch.float32
    # same int8 levels and exact integer scores; the kernel rounds P to bf16 (2^-9 relative) for P·V
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=6e-3)
    err_kernel = float((out - ref).norm() / ref.norm())
    err_int8 = float((ref - F.scaled_dot_product_attention(q, k, v)).norm() / ref.norm())
    assert err_kernel < 2e-3 and err_kernel < err_int8 / 5  # the test sees the kernel, not only int8 noise


def test_autotuned_path_bf16_and_fp32_v() -> None:
    q, k, v = _qkv(1, 2, 40, 32, seed=3)
    ref = at.int8_attention_ref(q, k, v, 16, 16)
    out = ta.int8_attention(q.to(DEV), k.to(DEV), v.to(DEV).bfloat16(), 16, 16)  # bf16 in -> bf16 out
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=1e-2)
    v32 = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(4))  # fp32 V: rounded to bf16 for P·V
    out32 = ta.int8_attention(q.to(DEV), k.to(DEV), v32.to(DEV), 16, 16).cpu()
    torch.testing.assert_close(out32, at.int8_attention_ref(q, k, v32, 16, 16), rtol=2e-2, atol=1e-2)


def test_registry_entries() -> None:
    import quantvggt  # noqa: F401  (registers the kernels)
    from quantvggt.lowbit.registry import get_kernel

    q, k, v = _qkv(1, 2, 20, 16)
    cpu = get_kernel("attention_int8", "cpu")
    assert cpu is not None and get_kernel("attention_int8", "cuda") is not None
    torch.testing.assert_close(cpu(q, k, v), at.int8_attention_ref(q, k, v), rtol=0, atol=0)
    assert ta.attention_forward(q, k[:, :1], v) is None  # unsupported (mismatched heads): caller runs the reference


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantvggt.kernels import triton_attention as ta

target = GPUTarget("cuda", 90, 32)  # Hopper (H100/H200)
sig = dict(x_ptr="*bf16", mean_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", N="i32", D="i32")
sig.update(SMOOTH="constexpr", BLOCK="constexpr", BLOCK_D="constexpr")
src = ASTSource(ta._quant_blocks_kernel, sig, constexprs={"SMOOTH": True, "BLOCK": 64, "BLOCK_D": 64})
assert "div.rn.f32" in triton.compile(src, target=target).asm["ptx"]
sig = dict(q_ptr="*i8", qs_ptr="*fp32", k_ptr="*i8", ks_ptr="*fp32", v_ptr="*bf16", o_ptr="*bf16")
sig.update(N_Q="i32", N_K="i32", D="i32", qk_scale="fp32", N_BUCKET="i32")
sig.update({c: "constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "EMULATE_BF16", "OUT_BF16")})
for bm, bn, bd, out in [(128, 64, 64, "*bf16"), (64, 64, 32, "*fp32")]:
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "EMULATE_BF16": False, "OUT_BF16": out == "*bf16"}
    src = ASTSource(ta._attn_fwd_kernel, {**sig, "o_ptr": out}, constexprs=consts)
    ptx = triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
    assert "wgmma" in ptx and ".s8" in ptx, "Q·K^T is not an int8 tensor-core MMA"
print("ok")
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path: object) -> None:
    # the interpreter runs the kernels' Python, not the GPU compiler: compile the GPU path (sm_90) ahead of time
    # to catch what only the compiler rejects (a previous kernel's constexpr re-bound in a static loop, say)
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, not a cache hit
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

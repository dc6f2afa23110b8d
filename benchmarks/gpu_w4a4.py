"""GPU check (run on a lent H100/H200): kernel correctness at full VGGT-1B shapes, then timings.

    python benchmarks/gpu_w4a4.py                 # prints correctness, per-shape GEMM ratios, whole-model ratios
    python benchmarks/gpu_w4a4.py --shapes-only   # per-shape table only: split vs fused (LN+prep, MMA layout) path

Targets (issue): W4A4 GEMM >= 2x faster than bf16 F.linear at M = 13740; whole 4-bit VGGT-1B forward for 10 frames at
518 px >= 2.5x faster than bf16 with >= 3.7x less weight memory. Every ratio is against a baseline in this process.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from quantvggt.kernels import reference as ref
from quantvggt.kernels import triton_w4a4 as tk
from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import dense_rotation, random_signs
from quantvggt.model import VGGT, VGGTConfig
from quantvggt.quant import get_recipe, quantize_

SHAPES = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]


def cuda_time(fn, repeat: int = 20) -> float:
    """Median milliseconds with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Correctness, then per-layer and (unless --shapes-only) whole-model timings."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes-only", action="store_true", help="per-layer table only (gpu_e2e.py times the model)")
    args = ap.parse_args()
    from quantvggt.kernels import triton_prep as tp

    dev = "cuda"
    print(torch.cuda.get_device_name())
    M = 13740
    print(
        "| K x N | act levels mismatch (split / fused+LN off-by-one) | GEMM max rel err | MMA layout == packed "
        "| bf16 ms | LN+bf16 ms | fake-quant ref ms | split ms (act_prep+gemm) | fused ms (LN+prep, MMA gemm) "
        "| split vs bf16 | fused vs LN+bf16 | vs ref | tile (split / MMA) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for K, N in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        signs = random_signs(K, 0).to(dev, torch.int8)
        asc = torch.rand(K, device=dev) + 0.5
        ln_w, ln_b = torch.randn(K, device=dev), torch.randn(K, device=dev)
        q, s = tk.act_prep(x, signs, asc, 1.0, 4)
        q_r, _s_r = ref.act_prep_ref(x, signs, asc, torch.ones(1, device=dev), 4)
        mism = float((q != q_r).float().mean())
        qf, _ = tp.fused_prep(x, signs, asc, 1.0, 4, norm=(ln_w, ln_b, 1e-5))
        qf_r, _ = ref.fused_prep_ref(x, signs, asc, torch.ones(1, device=dev), 4, norm=(ln_w, ln_b, 1e-5))
        d = (qf.int() - qf_r.int()).abs()
        mism_ln = f"{float((d > 0).float().mean()):.1e} (max {int(d.max())})"
        wl = torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8)
        wp = qz.pack_int4(wl)
        words = tk.w4_mma_layout(wp)
        ws, bias = torch.rand(N, device=dev), torch.randn(N, device=dev)
        y = tk.gemm(q, wp, s, ws, bias, packed=True)
        y_r = (q.float() @ wl.float().T) * s[:, None] * ws + bias  # exact in fp32 for int4 levels
        rel = float((y - y_r).abs().max() / y_r.abs().max())
        same = bool(torch.equal(tk.gemm_w4mma(q, words, s, ws, bias), y))
        w16 = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        t16 = cuda_time(lambda: F.linear(x, w16))
        t16ln = cuda_time(lambda: F.linear(F.layer_norm(x, (K,), ln_w.bfloat16(), ln_b.bfloat16()), w16))

        def w4a4() -> torch.Tensor:
            qx, sx = tk.act_prep(x, signs, asc, 1.0, 4)
            return tk.gemm(qx, wp, sx, ws, bias, packed=True, out_dtype=torch.bfloat16)

        def fused() -> torch.Tensor:
            qx, sx = tp.fused_prep(x, signs, asc, 1.0, 4, norm=(ln_w, ln_b, 1e-5))
            return tk.gemm_w4mma(qx, words, sx, ws, bias, out_dtype=torch.bfloat16)

        t4 = cuda_time(w4a4)
        tf = cuda_time(fused)
        # the reference approach (public QuantVGGT code): dense rotation matmul, fake-quantised activations, bf16 GEMM
        H = dense_rotation(random_signs(K, 0)).to(dev, torch.bfloat16)
        w_deq = (wl.float() * ws[:, None]).to(torch.bfloat16)

        def fake() -> torch.Tensor:
            xr = (x @ H) / asc.to(torch.bfloat16)
            sc = xr.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 7
            return F.linear(
                (torch.round(xr.float() / sc).clamp(-8, 7) * sc).to(torch.bfloat16), w_deq, bias.to(torch.bfloat16)
            )

        tr = cuda_time(fake)
        tiles = f"{tk._gemm_kernel.best_config} / {tk._gemm_w4mma_kernel.best_config}"
        print(
            f"| {K}x{N} | {mism:.2e} / {mism_ln} | {rel:.2e} | {same} | {t16:.3f} | {t16ln:.3f} | {tr:.3f} | {t4:.3f} "
            f"| {tf:.3f} | {t16 / t4:.2f}x | {t16ln / tf:.2f}x | {tr / t4:.2f}x | {tiles} |",
            flush=True,
        )
    if args.shapes_only:
        return
    torch.manual_seed(0)
    with torch.device(dev):  # initialising 1.2 B parameters on the host would take longer than the timings
        base = VGGT(VGGTConfig(track_head=None)).eval()
    q = copy.deepcopy(base)
    quantize_(q, get_recipe("quarot-w4a4", scope=("aggregator", "patch_embed", "camera_head")))
    x = torch.rand(10, 3, 518, 518, device=dev)
    with torch.no_grad():
        tb = cuda_time(lambda: base(x), 3)
        tq = cuda_time(lambda: q(x), 3)
    mem = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())
    print(
        f"whole VGGT-1B, 10 frames 518 px: bf16 {tb:.0f} ms, 4-bit {tq:.0f} ms -> {tb / tq:.2f}x; "
        f"weights bf16 {mem(base) / 2e9:.2f} GB vs 4-bit {mem(q) / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()

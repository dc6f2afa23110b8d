"""GPU breakdown of one W4A4 linear (run on a lent H100/H200): where the time goes.

    python benchmarks/gpu_w4a4_split.py

Prints, per VGGT-1B shape at M = 13740 tokens (10 frames at 518 px): the fused rotate+quantize kernel, our GEMM with
packed int4 weights (unpacked in registers) and with int8 weights, ``torch._int_mm`` (cuBLAS int8) and the bf16
matmul baseline, all timed in this process with ``triton.testing.do_bench`` (ms).
"""

from __future__ import annotations

import torch
import triton.testing as tt

from quantvggt.kernels import triton_w4a4 as tk
from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import random_signs


def main() -> None:
    """One row per shape."""
    d, M = "cuda", 13740
    print(torch.cuda.get_device_name())
    print("| K x N | act_prep | GEMM int4 (ours) | GEMM int8 (ours) | torch._int_mm | bf16 matmul |")
    print("|---|---|---|---|---|---|")
    for K, N in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]:
        x = torch.randn(M, K, device=d, dtype=torch.bfloat16)
        sg = random_signs(K, 0).to(d, torch.int8)
        a = torch.rand(K, device=d) + 0.5
        q, s = tk.act_prep(x, sg, a, 1.0, 4)
        wl = torch.randint(-8, 8, (N, K), device=d, dtype=torch.int8)
        wp = qz.pack_int4(wl)
        ws = torch.rand(N, device=d)
        w16 = torch.randn(N, K, device=d, dtype=torch.bfloat16)
        t = [
            tt.do_bench(lambda: tk.act_prep(x, sg, a, 1.0, 4)),
            tt.do_bench(lambda: tk.gemm(q, wp, s, ws, None, packed=True, out_dtype=torch.bfloat16)),
            tt.do_bench(lambda: tk.gemm(q, wl, s, ws, None, packed=False, out_dtype=torch.bfloat16)),
            tt.do_bench(lambda: torch._int_mm(q, wl.t())),
            tt.do_bench(lambda: x @ w16.t()),
        ]
        print(f"| {K}x{N} | " + " | ".join(f"{v:.3f}" for v in t) + " |")


if __name__ == "__main__":
    main()

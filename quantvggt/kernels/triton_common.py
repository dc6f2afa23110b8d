"""Triton helpers shared by the kernels (imported by each, so the kernel modules never import one another)."""

import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)

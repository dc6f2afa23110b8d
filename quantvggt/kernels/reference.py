"""Plain-torch references for the low-bit kernels (the ground truth the Triton and CPU paths are tested against)."""

from __future__ import annotations

import torch
from torch import Tensor

from quantvggt.lowbit import quantizer as qz
from quantvggt.lowbit.hadamard import rotate


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


def gemm_ref(q: Tensor, w: Tensor, a_scale: Tensor, w_scale: Tensor, bias: Tensor | None, packed: bool) -> Tensor:
    """``(q @ W^T)`` with exact integer accumulation, times per-token x per-channel scales, plus bias (fp32 out)."""
    wi = qz.unpack_int4(w) if packed else w
    acc = torch.matmul(q.double(), wi.double().T).to(torch.int32)
    y = acc.float() * a_scale[:, None] * w_scale[None, :]
    return y + bias if bias is not None else y

"""Triton kernels vs their plain-torch references (interpreter on CPU; integers must match exactly)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from quantvggt.kernels import reference as ref  # noqa: E402  (after TRITON_INTERPRET / sys.path set-up above)
from quantvggt.kernels import triton_w4a4 as tk  # noqa: E402  (after TRITON_INTERPRET / sys.path set-up above)
from quantvggt.lowbit import quantizer as qz  # noqa: E402  (after TRITON_INTERPRET / sys.path set-up above)
from quantvggt.lowbit.hadamard import random_signs  # noqa: E402  (after TRITON_INTERPRET / sys.path set-up above)

if not tk.INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEV = "cpu" if tk.INTERPRET else "cuda"  # the interpreter runs on host tensors; real kernels on the GPU


@pytest.mark.parametrize("K,rot,bits", [(64, True, 4), (128, True, 8), (64, False, 4), (256, True, 6)])
def test_act_prep_matches_reference_exactly(K: int, rot: bool, bits: int) -> None:
    g = torch.Generator().manual_seed(K)
    x = torch.randn(37, K, generator=g) * 3
    x[:, 5] *= 20  # an outlier channel
    signs = random_signs(K, 1).to(torch.int8) if rot else None
    ascale = torch.rand(K, generator=g) + 0.5
    q, s = tk.act_prep(x.to(DEV), None if signs is None else signs.to(DEV), ascale.to(DEV), 0.9, bits)
    q, s = q.cpu(), s.cpu()
    q_ref, s_ref = ref.act_prep_ref(x, signs, ascale, torch.tensor([0.9]), bits)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    mismatch = (q.int() != q_ref.int()).float().mean()
    assert mismatch == 0.0, f"{mismatch:.2%} of levels differ"


@pytest.mark.parametrize("packed", [True, False])
def test_gemm_matches_reference_exactly(packed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    M, N, K = 33, 40, 96
    q = torch.randint(-8, 8, (M, K), generator=g, dtype=torch.int8)
    w_levels = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    w = qz.pack_int4(w_levels) if packed else w_levels
    a_s, w_s, bias = torch.rand(M, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
    y = tk.gemm(q.to(DEV), w.to(DEV), a_s.to(DEV), w_s.to(DEV), bias.to(DEV), packed=packed).cpu()
    torch.testing.assert_close(y, ref.gemm_ref(q, w, a_s, w_s, bias, packed), rtol=1e-6, atol=1e-6)
    # integer accumulation is exact: dividing the scales out recovers integers
    acc = tk.gemm(q.to(DEV), w.to(DEV), torch.ones(M, device=DEV), torch.ones(N, device=DEV), None, packed=packed).cpu()
    assert torch.equal(acc, (q.double() @ w_levels.double().T).float())


def test_qlinear_forward_matches_integer_reference() -> None:
    from torch import nn

    from quantvggt.quant.linear import FakeQuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    ql = FakeQuantLinear(lin, 4, 4, random_signs(128, 0), torch.rand(128) + 0.5).to_quant_linear()
    x = torch.randn(2, 9, 128)
    y = tk.qlinear_forward(ql.to(DEV), x.to(DEV)).float().cpu()
    torch.testing.assert_close(y, ql.cpu().forward_int(x), rtol=1e-5, atol=1e-5)

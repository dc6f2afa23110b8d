"""The int4 MMA weight layout (prepared once at load) and the GEMM that reads it: exact integer sums."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from quantvggt.kernels import reference as ref  # noqa: E402  (after TRITON_INTERPRET is set by conftest)
from quantvggt.kernels import triton_w4a4 as tk  # noqa: E402
from quantvggt.lowbit import quantizer as qz  # noqa: E402

if not tk.INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEV = "cpu" if tk.INTERPRET else "cuda"


def test_layout_matches_reference_and_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(-8, 8, (5, 48), generator=g, dtype=torch.int8)
    levels[0, :8] = torch.tensor([-8, 7, -1, 0, 1, -7, 3, -8], dtype=torch.int8)  # extremes in one word
    packed = qz.pack_int4(levels)
    words = tk.w4_mma_layout(packed.to(DEV)).cpu()
    assert words.dtype == torch.int32 and words.shape == (5, 6)
    assert torch.equal(words, ref.w4_mma_layout_ref(packed))
    assert torch.equal(ref.w4_mma_unpack_ref(words), levels)
    # the high-nibble mask of a word is four int8 bytes equal to 16 x levels k4..k7 (no sign fix-up needed)
    hi = (words[0, 0].item() & 0xF0F0F0F0).to_bytes(4, "little")
    assert [int.from_bytes(hi[i : i + 1], "little", signed=True) for i in range(4)] == [16 * v for v in (1, -7, 3, -8)]
    with pytest.raises(ValueError, match="divisible by 8"):
        tk.w4_mma_layout(packed[:, :3])


@pytest.mark.parametrize("M,N,K,abits", [(33, 40, 96, 4), (17, 24, 64, 8), (5, 16, 136, 4)])
def test_gemm_w4mma_exact(M: int, N: int, K: int, abits: int) -> None:
    g = torch.Generator().manual_seed(M)
    lim = 2 ** (abits - 1)
    q = torch.randint(-lim, lim, (M, K), generator=g, dtype=torch.int8)
    levels = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    packed = qz.pack_int4(levels)
    words = tk.w4_mma_layout(packed.to(DEV))
    ones_m, ones_n = torch.ones(M, device=DEV), torch.ones(N, device=DEV)
    acc = tk.gemm_w4mma(q.to(DEV), words, ones_m, ones_n, None).cpu()
    assert torch.equal(acc, (q.double() @ levels.double().T).float())  # exact integer sums (K = 136: partial tile)
    a_s, w_s, bias = torch.rand(M, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
    args = (a_s.to(DEV), w_s.to(DEV), bias.to(DEV))
    y = tk.gemm_w4mma(q.to(DEV), words, *args).cpu()
    assert torch.equal(y, tk.gemm(q.to(DEV), packed.to(DEV), *args, packed=True).cpu())  # same epilogue, same bits
    torch.testing.assert_close(y, ref.gemm_ref(q, packed, a_s, w_s, bias, True), rtol=1e-6, atol=1e-6)


def test_prepared_words_cached_until_weights_change() -> None:
    from torch import nn

    from quantvggt.quant.linear import FakeQuantLinear

    torch.manual_seed(0)
    ql = FakeQuantLinear(nn.Linear(64, 16), 4, 4, None).to_quant_linear()
    assert tk.prepare_model_(nn.Sequential(ql)) == 1
    w1 = tk.prepared_words(ql)
    assert tk.prepared_words(ql) is w1  # computed once
    assert "_w4_mma" not in "".join(ql.state_dict())  # int4 stays the only weight at rest
    ql.set_weight(torch.randint(-8, 8, (16, 64), dtype=torch.int8), torch.ones(16))
    w2 = tk.prepared_words(ql)
    assert w2 is not w1 and torch.equal(w2, ref.w4_mma_layout_ref(ql.qweight))


def test_shape_keyed_tiles_prune() -> None:
    cfgs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in {t for ts in tk.W4_SHAPE_TILES.values() for t in ts}
    ]
    for (n, k), tiles in tk.W4_SHAPE_TILES.items():
        kept = tk._prune_for_shape(cfgs, {"N": n, "K": k})
        assert len(kept) == len(tiles)
    assert tk._prune_for_shape(cfgs, {"N": 40, "K": 96}) == cfgs  # unknown shape: every config

"""The fused input kernel ([LayerNorm] -> rotation -> smoothing -> per-token quantization) vs its torch reference.

Thresholds: without LayerNorm the levels are bit-identical (same butterflies, same division, same rounding). With
LayerNorm the kernel's two-pass fp32 mean/variance differs from torch's in the last bits, so a level sitting on a
rounding boundary may move by one: at most 0.1 % of levels may differ, by exactly 1, and scales agree to 2e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from quantvggt.kernels import reference as ref  # noqa: E402  (after TRITON_INTERPRET is set by conftest)
from quantvggt.kernels import triton_prep as tp  # noqa: E402
from quantvggt.kernels import triton_w4a4 as tk  # noqa: E402
from quantvggt.lowbit.hadamard import HadamardPlan, random_signs  # noqa: E402

if not tp.INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEV = "cpu" if tp.INTERPRET else "cuda"  # the interpreter runs on host tensors; real kernels on the GPU
LN_OFF_BY_ONE = 1e-3  # fraction of levels allowed to differ (by exactly one) when LayerNorm is fused


def _check(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor, exact: bool) -> None:
    q, s = q.cpu(), s.cpu()
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    diff = (q.int() - q_ref.int()).abs()
    if exact:
        assert torch.equal(s, s_ref)
        assert int(diff.max()) == 0, f"{float((diff > 0).float().mean()):.2%} of levels differ"
    else:
        torch.testing.assert_close(s, s_ref, rtol=2e-6, atol=0)
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= LN_OFF_BY_ONE


# widths: power of two (full FWHT), block-diagonal 56 = 7 x 8 (zero-padded to 64 in the program), 112 = 7 x 16
@pytest.mark.parametrize("K", [64, 56, 112])
@pytest.mark.parametrize("norm", [None, "affine", "plain"])
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_prep_matches_reference(K: int, norm: str | None, bits: int) -> None:
    g = torch.Generator().manual_seed(K + bits)
    x = (torch.randn(37, K, generator=g) * 3).bfloat16()  # bf16 input as in the model; M not a multiple of BLOCK_M
    x[:, 5] *= 20  # an outlier channel
    plan = HadamardPlan.for_width(K)
    signs = random_signs(K, 1).to(torch.int8)
    ascale = torch.rand(K, generator=g) + 0.5
    ln = {
        None: None,
        "affine": (torch.randn(K, generator=g), torch.randn(K, generator=g), 1e-5),
        "plain": (None, None, 1e-6),
    }[norm]
    ln_dev = None if ln is None else tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ln)
    q, s = tp.fused_prep(x.to(DEV), signs.to(DEV), ascale.to(DEV), 0.9, bits, block=plan.block, norm=ln_dev)
    q_ref, s_ref = ref.fused_prep_ref(x, signs, ascale, torch.tensor([0.9]), bits, plan, ln)
    _check(q, s, q_ref, s_ref, exact=norm is None)


def test_fused_prep_without_rotation_and_bad_block() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 48, generator=g)
    ascale = torch.rand(48, generator=g) + 0.5
    q, s = tp.fused_prep(x.to(DEV), None, ascale.to(DEV), 1.0, 4)
    _check(q, s, *ref.fused_prep_ref(x, None, ascale, torch.ones(1), 4), exact=True)
    with pytest.raises(ValueError, match="power of two dividing"):
        tp.fused_prep(x.to(DEV), torch.ones(48, dtype=torch.int8, device=DEV), ascale.to(DEV), 1.0, 4, block=48)


def _quant_linear(K: int, N: int, w_bits: int = 4, a_bits: int = 4) -> nn.Module:
    from quantvggt.quant.linear import FakeQuantLinear

    torch.manual_seed(0)
    return FakeQuantLinear(nn.Linear(K, N), w_bits, a_bits, random_signs(K, 0), torch.rand(K) + 0.5).to_quant_linear()


@pytest.mark.parametrize("K,w_bits", [(128, 4), (56, 4), (64, 8)])
def test_qlinear_fused_path_matches_integer_reference(K: int, w_bits: int) -> None:
    ql = _quant_linear(K, 40, w_bits)
    x = torch.randn(2, 9, K)
    y = tk.qlinear_forward(ql.to(DEV), x.to(DEV)).float().cpu()
    torch.testing.assert_close(y, ql.cpu().forward_int(x), rtol=1e-5, atol=1e-5)


def test_split_path_still_available(monkeypatch: pytest.MonkeyPatch) -> None:
    ql = _quant_linear(64, 24)
    x = torch.randn(11, 64)
    monkeypatch.setenv(tk.PATH_ENV, "split")
    y = tk.qlinear_forward(ql.to(DEV), x.to(DEV)).float().cpu()
    torch.testing.assert_close(y, ql.cpu().forward_int(x), rtol=1e-5, atol=1e-5)


def test_paley_and_16_bit_layers_are_not_fused() -> None:
    assert not tp.supports(_quant_linear(96, 8))  # Paley plan: torch path
    assert not tp.supports(_quant_linear(64, 8, 8, 16))


@pytest.mark.parametrize("path", ["fused", "split"])
def test_attached_norm_is_applied(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tk.PATH_ENV, path)  # fused: inside the prep kernel; split: a separate LayerNorm first
    ql = _quant_linear(64, 32)
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 7, 64) * 2 + 1
    ql.__dict__["_prenorm"] = ln.to(DEV)  # what fuse_norms_ attaches
    y = tk.qlinear_forward(ql.to(DEV), x.to(DEV)).float().cpu()
    with torch.no_grad():
        want = ql.cpu().forward_int(ln.cpu()(x))
    # an off-by-one level (LN rounding) moves an output by at most one level x weight column: loose but telling
    err = float((y - want).norm() / want.norm())
    assert err < 1e-3, err


def test_fuse_norms_wires_blocks_and_keeps_state_dict(tiny_model: nn.Module) -> None:
    from quantvggt.quant import get_recipe, quantize_

    quantize_(tiny_model, get_recipe("rtn-w4a4"))
    keys = set(tiny_model.state_dict())
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        before = tiny_model(images)["depth"]
    n = tp.fuse_norms_(tiny_model)
    depth = tiny_model.config.aggregator.depth
    assert n >= 2 * 2 * depth  # norm1 -> qkv and norm2 -> fc1 of every frame and global block (+ quantized ViT's)
    assert set(tiny_model.state_dict()) == keys
    blk = tiny_model.aggregator.frame_blocks[0]
    assert isinstance(blk.norm1, tp.DeferredLayerNorm) and tp.attached_norm(blk.attn.qkv) is blk.norm1
    with torch.no_grad():  # off CUDA a deferred norm is a plain LayerNorm: same outputs
        assert torch.equal(tiny_model(images)["depth"], before)
    assert tp.unfuse_norms_(tiny_model) == n
    assert type(blk.norm1) is nn.LayerNorm and tp.attached_norm(blk.attn.qkv) is None

"""The CPU QuantLinear path vs the fake-quant reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantvggt.kernels.cpu import hadamard_kron, qlinear_forward
from quantvggt.lowbit.hadamard import hadamard_transform, random_signs
from quantvggt.quant.linear import FakeQuantLinear


@pytest.mark.parametrize("K", [64, 128, 1024, 2048])
def test_kron_hadamard_equals_fwht(K: int) -> None:
    x = torch.randn(5, K, dtype=torch.float64)
    torch.testing.assert_close(hadamard_kron(x), hadamard_transform(x))


@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (6, 6), (8, 8), (4, 16)])
@pytest.mark.parametrize("K", [128, 96])  # 96: Paley construction falls back to the structured transform
@pytest.mark.parametrize("tokens", [33, 300])  # below / above the fbgemm threshold
def test_cpu_path_matches_integer_reference(bits: tuple[int, int], K: int, tokens: int) -> None:
    torch.manual_seed(0)
    ql = FakeQuantLinear(nn.Linear(K, 48), *bits, random_signs(K, 0), torch.rand(K) + 0.5).to_quant_linear()
    x = torch.randn(3, tokens // 3, K)
    y, want = qlinear_forward(ql, x), ql.forward_int(x)
    # the two rotations round differently, so a near-tie level may flip; compare by relative error
    rel = (y - want).norm() / want.norm()
    assert rel < 2e-3, rel


def test_fbgemm_gemm_is_exact_on_identical_levels() -> None:
    from quantvggt.kernels.cpu import _fbgemm_ok, act_levels

    torch.manual_seed(1)
    ql = FakeQuantLinear(nn.Linear(256, 64), 4, 4, random_signs(256, 0), torch.rand(256) + 0.5).to_quant_linear()
    assert _fbgemm_ok(ql)
    x = torch.randn(300, 256)
    levels, s = act_levels(ql, x)
    want = (levels.double() @ ql.int_weight().double().T) * s.double() * ql.w_scale.double() + ql.bias.double()
    y = qlinear_forward(ql, x)
    assert float((y.double() - want).abs().max() / want.abs().max()) < 1e-6


def test_auto_backend_uses_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import quantvggt.kernels.cpu as cpu

    calls = []
    orig = cpu.qlinear_forward
    monkeypatch.setattr(cpu, "qlinear_forward", lambda layer, x: calls.append(1) or orig(layer, x))
    ql = FakeQuantLinear(nn.Linear(64, 8), 4, 4, None).to_quant_linear()
    ql(torch.randn(2, 64))
    assert calls == [1]

"""QuantLinear: integer reference path vs fake-quant path, and folding from the calibration wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantvggt.lowbit.hadamard import random_signs
from quantvggt.quant.linear import FakeQuantLinear, QuantLinear


def _layer(n_in: int = 128, n_out: int = 96) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out)


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (4, 8), (6, 6), (8, 8), (4, 16), (8, 16)])
@pytest.mark.parametrize("rot", [False, True])
def test_int_path_matches_fake_path(w_bits: int, a_bits: int, rot: bool) -> None:
    lin = _layer()
    signs = random_signs(128, 0) if rot else None
    smooth = torch.rand(128) + 0.5
    ql = FakeQuantLinear(lin, w_bits, a_bits, signs, smooth).to_quant_linear()
    x = torch.randn(3, 17, 128) * 2
    y_int, y_fake = ql.forward_int(x), ql.forward_fake(x)
    rel = (y_int - y_fake).abs().max() / y_fake.abs().max()
    assert rel < 1e-5, rel
    ref = lin(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - y_int).pow(2).sum())
    assert sqnr > {4: 8, 6: 18, 8: 30}[min(w_bits, a_bits)], sqnr


def test_fold_matches_calibration_wrapper() -> None:
    lin = _layer()
    fake = FakeQuantLinear(
        lin, 4, 4, random_signs(128, 1), torch.rand(128) + 0.5, learn_smooth=True, lwc=True, lac=True, clip_init=1.0
    )
    x = torch.randn(40, 128)
    with torch.no_grad():
        want = fake(x)
    got = fake.to_quant_linear().forward_fake(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_storage_and_bytes() -> None:
    ql = FakeQuantLinear(_layer(256, 64), 4, 4, random_signs(256, 0)).to_quant_linear()
    assert ql.qweight.dtype == torch.uint8 and ql.qweight.shape == (64, 128)
    fp16 = 256 * 64 * 2
    assert ql.weight_bytes() < fp16 / 3


def test_backend_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    ql = FakeQuantLinear(_layer(), 4, 4, None).to_quant_linear()
    x = torch.randn(2, 128)
    monkeypatch.setenv("QUANTVGGT_QLINEAR_BACKEND", "int")
    torch.testing.assert_close(ql(x), ql.forward_int(x))
    monkeypatch.setenv("QUANTVGGT_QLINEAR_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ql(x)
    with pytest.raises(ValueError):
        QuantLinear(9, 4, 4, 4, True, False)

"""Quantizers and int4 packing."""

from __future__ import annotations

import pytest
import torch

from quantvggt.lowbit import quantizer as qz


def test_pack_unpack_all_int4_values() -> None:
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    p = qz.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert torch.equal(qz.unpack_int4(p), q)


def test_pack_rejects_odd_width() -> None:
    with pytest.raises(ValueError):
        qz.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_per_token_round_trip_error_bounded(bits: int) -> None:
    x = torch.randn(64, 256)
    q, s = qz.per_token_quant(x, bits)
    assert q.abs().max() <= 2 ** (bits - 1)
    err = (q * s - x).abs()
    assert torch.all(err <= s / 2 + 1e-6)


@pytest.mark.parametrize("bits,min_sqnr_db", [(4, 15.0), (8, 40.0)])
def test_per_channel_weight_sqnr(bits: int, min_sqnr_db: float) -> None:
    w = torch.randn(128, 256)
    q, s = qz.per_channel_weight_quant(w, bits)
    deq = q * s[:, None]
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum())
    assert sqnr > min_sqnr_db


def test_ste_passes_gradient() -> None:
    x = torch.randn(10, requires_grad=True)
    qz.round_ste(x * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((10,), 3.0))

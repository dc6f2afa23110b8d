"""Layer specs: the one place a quantized layer's bits, shapes and flags are written and read."""

from __future__ import annotations

import pytest
import torch

from quantvggt.quant import QuantConv2d, QuantConv2dSpec, QuantLinear, QuantLinearSpec


def test_linear_spec_round_trip() -> None:
    spec = QuantLinearSpec(64, 96, 4, 8, True, True)
    layer = QuantLinear.from_spec(spec)
    assert layer.spec() == spec and layer.qweight.shape == (96, 32)
    assert QuantLinearSpec.from_dict(spec.to_dict()) == spec


def test_conv_spec_round_trip() -> None:
    conv = torch.nn.ConvTranspose2d(8, 6, kernel_size=2, stride=2)
    q = QuantConv2d.from_float(conv, 4)
    d = q.spec().to_dict()
    assert d["kernel_size"] == [2, 2] and d["transposed"] is True
    again = QuantConv2d.from_spec(QuantConv2dSpec.from_dict(d))
    again.load_state_dict(q.state_dict())
    x = torch.rand(1, 8, 5, 5)
    assert torch.equal(again(x), q(x))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"w_bits": "4"}, "w_bits must be int"),
        ({"bias": 1}, "bias must be bool"),
        ({"in_features": -2}, "in_features must be int"),
        ({"extra": 1}, "unknown keys \\['extra'\\]"),
        ({"w_bits": 5}, "unsupported bits"),
    ],
)
def test_linear_spec_rejects_bad_entries(change: dict, message: str) -> None:
    d = {**QuantLinearSpec(64, 96, 4, 8, True, True).to_dict(), **change}
    with pytest.raises(ValueError, match=f"layer x: .*{message}"):
        QuantLinear.from_spec(QuantLinearSpec.from_dict(d, "layer x"))


def test_missing_keys_are_named() -> None:
    with pytest.raises(ValueError, match="missing keys \\['rotate'\\]"):
        QuantLinearSpec.from_dict({"in_features": 8, "out_features": 8, "w_bits": 4, "a_bits": 4, "bias": False})

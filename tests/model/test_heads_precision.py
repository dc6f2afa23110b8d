"""Heads precision: fp32 (upstream, the default) or bf16 autocast; outputs stay float32 either way."""

from __future__ import annotations

import pytest
import torch

from quantvggt.model import VGGT


def test_bf16_heads_close_to_fp32_and_default_is_fp32(tiny_model: VGGT) -> None:
    assert tiny_model.heads_precision == "fp32"
    x = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        ref = tiny_model(x)
        tiny_model.heads_precision = "bf16"
        got = tiny_model(x)
    for k in ("pose_enc", "depth", "world_points"):
        assert got[k].dtype == torch.float32
        rel = float((got[k] - ref[k]).norm() / ref[k].norm())
        assert 0 < rel < 5e-2, (k, rel)  # bf16 has 8 mantissa bits: ~1e-2, never exact
    tiny_model.heads_precision = "fp16?"
    with pytest.raises(ValueError, match="heads_precision"):
        tiny_model(x)

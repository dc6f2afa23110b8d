"""torch.compile: the float and the quantized model trace with zero graph breaks and match eager outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from quantvggt.model import VGGT
from quantvggt.quant import QuantLinear, get_recipe, quantize_


@pytest.fixture
def quantized(tiny_model: VGGT) -> VGGT:
    quantize_(tiny_model, get_recipe("quarot-w4a4", scope=("aggregator", "camera_head", "dpt_heads")))
    return tiny_model


def _breaks(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(x)
    return [b.reason.splitlines()[0] for b in ex.break_reasons]


def test_float_model_has_no_graph_breaks(tiny_model: VGGT) -> None:
    assert _breaks(tiny_model, torch.rand(1, 3, 3, 28, 42)) == []


def test_quantized_model_has_no_graph_breaks(quantized: VGGT) -> None:
    assert _breaks(quantized, torch.rand(1, 3, 3, 28, 42)) == []


def test_compiled_quantized_model_matches_eager_and_copies_stay_separate(quantized: VGGT) -> None:
    torch._dynamo.reset()
    x = torch.rand(1, 3, 3, 28, 42)
    with torch.no_grad():
        want = quantized(x)
    other = copy.deepcopy(quantized)
    handles = {m._handle for m in quantized.modules() if isinstance(m, QuantLinear)}
    assert handles.isdisjoint({m._handle for m in other.modules() if isinstance(m, QuantLinear)})
    quantized.compile_(backend="aot_eager")
    with torch.no_grad():
        got = quantized(x)
        for k in ("pose_enc", "depth", "world_points"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        other.aggregator.frame_blocks[0].attn.qkv.w_scale.mul_(2.0)  # the copy's own layers, not the original's
        other.compile_(backend="aot_eager")
        assert not torch.allclose(other(x)["depth"], got["depth"])


def test_frame_count_changes_do_not_recompile_per_size(tiny_model: VGGT) -> None:
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    tiny_model.compile_(backend="aot_eager")
    with torch.no_grad():
        # warm-up: one and several frames, and over 8 frames, where the DPT heads walk chunks of 8 in Python (the loop
        # a whole-model graph specialises on: compiled whole, every new frame count recompiled)
        for frames in (2, 3, 9, 17):
            tiny_model(torch.rand(1, frames, 3, 28, 42))
        warm = counts["stats"]["unique_graphs"]
        for frames in (20, 11, 30, 41, 5, 26):
            tiny_model(torch.rand(1, frames, 3, 28, 42))
    assert counts["stats"]["unique_graphs"] == warm, dict(counts["stats"])

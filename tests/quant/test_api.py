"""quantize_ end to end on the tiny model: recipes, ordering of methods, scope, overrides, report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from quantvggt.model import VGGT, VGGTConfig
from quantvggt.quant import RECIPES, QuantLinear, QuantVGGTConfig, RTNConfig, get_recipe, quantize_
from quantvggt.quant.api import select_targets
from quantvggt.quant.config import QuantConfig
from tests.quant.conftest import calib_batches


def _last_tokens(model: VGGT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.aggregator(x, keep_layers=[-1])[0][-1]


def _rel_err(model: VGGT, ref: VGGT, held: list[torch.Tensor]) -> float:
    errs = []
    for x in held:
        a, b = _last_tokens(model, x[None]), _last_tokens(ref, x[None])
        errs.append(float((a - b).norm() / b.norm()))
    return sum(errs) / len(errs)


def test_w4a4_error_ordered_quantvggt_quarot_rtn(planted: VGGT) -> None:
    calib, held = calib_batches(6, 0), calib_batches(3, 99)  # held-out inputs never seen in calibration
    errs = {}
    for recipe in ("rtn-w4a4", "quarot-w4a4", "quantvggt-w4a4"):
        q = copy.deepcopy(planted)
        quantize_(q, get_recipe(recipe), calib)
        errs[recipe] = _rel_err(q, planted, held)
    assert errs["quantvggt-w4a4"] < errs["quarot-w4a4"] < errs["rtn-w4a4"], errs


def test_w8a8_near_lossless(planted: VGGT) -> None:
    q = copy.deepcopy(planted)
    quantize_(q, get_recipe("quantvggt-w8a8", epochs=2), calib_batches(2, 0))
    assert _rel_err(q, planted, calib_batches(2, 5)) < 0.01


def test_reconstruction_lowers_block_loss(planted: VGGT) -> None:
    q = copy.deepcopy(planted)
    rep = quantize_(q, get_recipe("quantvggt-w4a4", epochs=5, lr_scale=1e-2, lr_clip=5e-2), calib_batches(3, 0))
    assert len(rep.block_loss) == 8
    assert list(rep.block_loss)[:3] == [
        "aggregator.frame_blocks.0",
        "aggregator.global_blocks.0",
        "aggregator.frame_blocks.1",
    ]
    assert all(after < before for before, after in rep.block_loss.values())


def test_global_blocks_calibrated_with_cross_frame_layout(planted: VGGT, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    blk = planted.aggregator.global_blocks[0]
    orig = type(blk).forward

    def spy(self, x, pos=None):
        if self is blk:
            seen.setdefault("shape", tuple(x.shape))
        return orig(self, x, pos=pos)

    monkeypatch.setattr(type(blk), "forward", spy)
    quantize_(planted, get_recipe("quantvggt-w4a4", epochs=1), calib_batches(1, 0))
    # 1 batch x 3 frames x (5 special + 2*3 patches) tokens in one sequence
    assert seen["shape"] == (1, 3 * 11, 64)


def test_all_recipes_run_and_replace_layers(tiny_model: VGGT) -> None:
    calib = calib_batches(1, 0)
    assert {"rtn-w4a4", "smoothquant-w8a8", "quarot-w6a6", "quantvggt-w4a16", "quantvggt-w4a8"} <= set(RECIPES)
    for name in ("rtn-w4a4", "smoothquant-w6a6", "quarot-w4a16"):
        q = copy.deepcopy(tiny_model)
        rep = quantize_(q, get_recipe(name), calib)
        assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 32 == len(rep.layers)
        with torch.no_grad():
            assert torch.isfinite(q(torch.rand(2, 3, 28, 28))["depth"]).all()


def test_vggt_1b_scope_sizes() -> None:
    with torch.device("meta"):
        big = VGGT(VGGTConfig())
    assert len(select_targets(big, RTNConfig())) == 192
    assert len(select_targets(big, RTNConfig(scope=("aggregator", "patch_embed")))) == 192 + 96
    cam = select_targets(big, RTNConfig(scope=("camera_head",)))
    assert "camera_head.trunk.0.attn.qkv" in cam and "camera_head.embed_pose" not in cam  # 9 inputs: not packable


def test_layer_bit_overrides(tiny_model: VGGT) -> None:
    cfg = RTNConfig(layer_bits={"aggregator.global_blocks.3.*": (8, 8), "aggregator.frame_blocks.0.mlp.fc2": (4, 16)})
    rep = quantize_(tiny_model, cfg)
    assert rep.layers["aggregator.global_blocks.3.attn.qkv"]["w_bits"] == 8
    assert rep.layers["aggregator.frame_blocks.0.mlp.fc2"]["a_bits"] == 16
    assert rep.layers["aggregator.frame_blocks.0.mlp.fc1"]["w_bits"] == 4


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="bits"):
        RTNConfig(w_bits=5)
    with pytest.raises(ValueError, match="scope"):
        RTNConfig(scope=("depth_head",))
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("gptq-w4a4")
    c = QuantVGGTConfig(epochs=3, layer_bits={"x.*": (8, 8)})
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_calibration_required_and_no_double_quantization(tiny_model: VGGT) -> None:
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_(copy.deepcopy(tiny_model), get_recipe("smoothquant-w4a4"))
    quantize_(tiny_model, get_recipe("rtn-w4a4"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(tiny_model, get_recipe("rtn-w4a4"))


def test_report_bytes_and_ids(tiny_model: VGGT) -> None:
    calib = [{"id": "scene_a/0-2", "images": calib_batches(1, 0)[0]}]
    rep = quantize_(tiny_model, get_recipe("quarot-w4a4"), calib)
    assert rep.calibration_ids == ["scene_a/0-2"]
    agg_fp32 = 32 * 64 * 64 * 4 * 3 * 4  # approximate lower bound is enough: the aggregator shrank
    assert rep.bytes_by_component["aggregator"] < agg_fp32
    assert rep.fp32_bytes == 2 * rep.fp16_bytes
    assert rep.quantized_bytes == sum(rep.bytes_by_component.values())
    assert json.dumps(rep.to_dict())

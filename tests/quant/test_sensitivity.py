"""Mixed precision: measured sensitivity, a greedy map that meets the budget, predicted bytes == actual bytes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from quantvggt.model import VGGT
from quantvggt.quant import get_recipe, quantize_
from quantvggt.quant.sensitivity import choose_bits, mixed_precision, read_layer_bits
from quantvggt.quant.steps import select_targets
from tests.quant.conftest import calib_batches


def test_budget_met_and_predicted_bytes_are_exact(tiny_model: VGGT) -> None:
    config = get_recipe("rtn-w4a4", scope=("aggregator", "camera_head"))
    calib = calib_batches(1, 0)
    bm = mixed_precision(tiny_model, config, calib, budget=1.5)
    assert bm.compression_vs_fp16 >= 1.5
    widths = {w for w, _ in bm.layer_bits.values()}
    assert len(widths) > 1, bm.summary()  # a real mix at this budget
    q = copy.deepcopy(tiny_model)
    rep = quantize_(q, get_recipe("rtn-w4a4", scope=config.scope, layer_bits=bm.layer_bits), calib)
    assert rep.bytes_16bit == bm.predicted_bytes
    float_layers = [n for n, (w, _) in bm.layer_bits.items() if w == 16]
    assert all(n not in rep.layers for n in float_layers)  # (16, 16) keeps the layer float


def test_greedy_keeps_sensitive_layers_wide(tiny_model: VGGT) -> None:
    config = get_recipe("rtn-w4a4")
    names = list(select_targets(tiny_model, config))
    hot = names[3]
    sens = {n: {16: 0.0, 8: 1e-6, 4: 1e-4} for n in names}
    sens[hot] = {16: 0.0, 8: 1.0, 4: 10.0}
    bm = choose_bits(tiny_model, config, sens, budget=1.2)  # all-w4 would be 1.30x for this model and scope
    assert bm.layer_bits[hot] == (16, 16)
    assert sum(w == 4 for w, _ in bm.layer_bits.values()) > 0


def test_unreachable_budget_and_bad_arguments(tiny_model: VGGT) -> None:
    config = get_recipe("rtn-w4a4")
    sens = {n: {16: 0.0, 8: 0.1, 4: 0.2} for n in select_targets(tiny_model, config)}
    with pytest.raises(ValueError, match="budget unreachable"):
        choose_bits(tiny_model, config, sens, budget=50.0)
    with pytest.raises(ValueError, match="exactly one"):
        choose_bits(tiny_model, config, sens)


def test_layer_bits_file_round_trip(tiny_model: VGGT, tmp_path: Path) -> None:
    config = get_recipe("rtn-w4a4")
    sens = {n: {16: 0.0, 8: 0.1, 4: 0.3} for n in select_targets(tiny_model, config)}
    bm = choose_bits(tiny_model, config, sens, budget=1.15)
    f = tmp_path / "bits.json"
    f.write_text(json.dumps(bm.to_json()))
    assert read_layer_bits(f) == bm.layer_bits
    f.write_text('{"layer_bits": {"a": [4]}}')
    with pytest.raises(ValueError, match="bits.json: expected"):
        read_layer_bits(f)
    assert torch.isfinite(torch.tensor(bm.predicted_error))

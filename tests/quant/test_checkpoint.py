"""Quantized checkpoint save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantvggt.model import VGGT
from quantvggt.model.loading import CheckpointError
from quantvggt.quant import get_recipe, load_quantized, quantize_, save_quantized
from tests.quant.conftest import calib_batches


def test_round_trip_is_bit_identical(tiny_model: VGGT, tmp_path: Path) -> None:
    from quantvggt.quant.api import source_sha256

    sha = source_sha256(tiny_model)
    quantize_(tiny_model, get_recipe("quantvggt-w4a4", epochs=1), [{"id": "s0", "images": calib_batches(1, 0)[0]}])
    out = save_quantized(tiny_model, tmp_path / "ckpt")
    loaded = load_quantized(out)
    x = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        a, b = tiny_model(x), loaded(x)
    for k in ("pose_enc", "depth", "world_points"):
        assert torch.equal(a[k], b[k]), k
    meta = json.loads((out / "quant.json").read_text())
    assert meta["config"]["method"] == "quantvggt" and meta["config"]["w_bits"] == 4
    assert meta["calibration_ids"] == ["s0"]
    assert meta["source_sha256"] == sha
    assert meta["library_version"]
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary folder left behind


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no quant.json"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(torch.nn.Module(), tmp_path / "x")  # type: ignore[arg-type]


def test_dpt_heads_weight_only_round_trip(tiny_model: VGGT, tmp_path: Path) -> None:
    import copy

    from quantvggt.quant.linear import QuantConv2d

    ref = copy.deepcopy(tiny_model)
    rep = quantize_(tiny_model, get_recipe("rtn-w4a16", scope=("aggregator", "dpt_heads")))
    convs = [m for m in tiny_model.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 2 * 32 and any(
        c.transposed for c in convs
    )  # every conv of both DPT heads, incl. ConvTranspose
    assert rep.bytes_by_component["depth_head"] < 0.4 * 4 * sum(p.numel() for p in ref.depth_head.parameters())
    x = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        a, want = tiny_model(x), ref(x)
    rel = float((a["depth"] - want["depth"]).norm() / want["depth"].norm())
    assert rel < 0.05, rel
    loaded = load_quantized(save_quantized(tiny_model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(x)["world_points"], a["world_points"])

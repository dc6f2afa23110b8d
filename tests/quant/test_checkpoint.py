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


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_format_v1_checkpoint_still_loads_and_matches_its_outputs() -> None:
    """tests/fixtures/quantized-v1 was written by the code before layer specs (format version 1)."""
    from safetensors.torch import load_file

    model = load_quantized(FIXTURES / "quantized-v1")
    io = load_file(str(FIXTURES / "quantized-v1-io.safetensors"))
    assert model.image_size == 56  # v1 kept image_size beside model_config
    assert model.quant_meta["block_loss"] == {}  # quarot: no reconstruction
    with torch.no_grad():
        out = model(io["images"])
    for k in ("depth", "pose_enc"):
        assert torch.allclose(out[k], io[k], rtol=1e-5, atol=1e-6), k


def _copy_ckpt(tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "quantized-v1", dst)
    return dst


def _edit(ckpt: Path, fn) -> None:
    doc = json.loads((ckpt / "quant.json").read_text())
    fn(doc)
    (ckpt / "quant.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=99), "format version 99 is newer"),
        (lambda d: d.pop("layers"), r"missing keys \['layers'\]"),
        (lambda d: d["layers"]["aggregator.frame_blocks.0.attn.qkv"].update(a_bits=8), "says w4a8 but the recorded"),
        (lambda d: d["layers"]["aggregator.frame_blocks.0.attn.qkv"].pop("rotate"), "missing keys"),
        (
            lambda d: d["layers"].update({"aggregator.nope": d["layers"]["aggregator.frame_blocks.0.attn.qkv"]}),
            "does not exist",
        ),
        (lambda d: d["config"].update(method="gptq"), "unknown quantization method 'gptq'"),
        (lambda d: d["model_config"].update(image_size=-3), "invalid model_config"),
    ],
)
def test_bad_quant_json_is_a_clear_error_naming_the_file(tmp_path: Path, edit, message: str) -> None:
    ckpt = _copy_ckpt(tmp_path)
    _edit(ckpt, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_quantized(ckpt)
    assert "quant.json" in str(e.value)


def test_quant_json_that_is_not_json(tmp_path: Path) -> None:
    ckpt = _copy_ckpt(tmp_path)
    (ckpt / "quant.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"quant.json: not valid JSON"):
        load_quantized(ckpt)


def test_saved_checkpoints_are_format_v2(tiny_model: VGGT, tmp_path: Path) -> None:
    rep = quantize_(tiny_model, get_recipe("quantvggt-w4a4", epochs=1), [calib_batches(1, 0)[0]])
    out = save_quantized(tiny_model, tmp_path / "ckpt")
    doc = json.loads((out / "quant.json").read_text())
    assert doc["format_version"] == 2 and doc["model_config"]["image_size"] == tiny_model.image_size
    spec = doc["layers"]["aggregator.frame_blocks.0.attn.qkv"]
    assert set(spec) == {"in_features", "out_features", "w_bits", "a_bits", "bias", "rotate"}
    assert doc["block_loss"]["aggregator.frame_blocks.0"] == list(rep.block_loss["aggregator.frame_blocks.0"])


def test_attention_mode_is_recorded_and_reloaded(tiny_model: VGGT, tmp_path: Path) -> None:
    from quantvggt.model.aggregator import set_attention
    from quantvggt.quant.checkpoint import read_quant_meta

    quantize_(tiny_model, get_recipe("rtn-w4a4"))
    sdpa = save_quantized(tiny_model, tmp_path / "sdpa")
    assert json.loads((sdpa / "quant.json").read_text())["attention"] == "sdpa"
    out = save_quantized(set_attention(tiny_model, "int8"), tmp_path / "int8")
    doc = json.loads((out / "quant.json").read_text())
    assert doc["attention"] == "int8" and doc["model_config"]["aggregator"]["attention"] == "int8"
    assert read_quant_meta(out)["attention"] == "int8"
    loaded = load_quantized(out)
    assert loaded.config.aggregator.attention == "int8"
    assert {b.attn.attention for b in loaded.aggregator.global_blocks} == {"int8"}
    assert load_quantized(sdpa).config.aggregator.attention == "sdpa"


def test_older_files_without_attention_load_as_sdpa(tmp_path: Path) -> None:
    from quantvggt.quant.checkpoint import read_quant_meta

    assert "attention" not in json.loads((FIXTURES / "quantized-v1" / "quant.json").read_text())
    assert read_quant_meta(FIXTURES / "quantized-v1")["attention"] == "sdpa"
    assert load_quantized(FIXTURES / "quantized-v1").config.aggregator.attention == "sdpa"
    ckpt = _copy_ckpt(tmp_path)  # a file with only the top-level key (model_config without it) gets int8
    _edit(ckpt, lambda d: d.update(attention="int8"))
    assert load_quantized(ckpt).config.aggregator.attention == "int8"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(attention="fp8"), "attention must be one of"),
        (
            lambda d: (d.update(attention="int8"), d["model_config"]["aggregator"].update(attention="sdpa")),
            "attention 'int8' disagrees with model_config's 'sdpa'",
        ),
    ],
)
def test_bad_attention_metadata_is_a_clear_error(tmp_path: Path, edit, message: str) -> None:
    ckpt = _copy_ckpt(tmp_path)
    _edit(ckpt, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(ckpt)

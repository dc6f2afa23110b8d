"""Selectable frame/global attention: exact SDPA (default) or INT8 Q·K^T, in the config and in checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from quantvggt.lowbit import registry
from quantvggt.model import VGGT, VGGTConfig
from quantvggt.model.aggregator import set_attention
from quantvggt.model.layers import Attention
from tests.conftest import tiny_config_dict


def _kinds(model: torch.nn.Module) -> dict[str, str]:
    return {n: m.attention for n, m in model.named_modules() if isinstance(m, Attention)}


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, 28, 42, generator=torch.Generator().manual_seed(seed))


def test_default_is_exact_attention(tiny_model: VGGT) -> None:
    assert tiny_model.config.aggregator.attention == "sdpa"
    assert set(_kinds(tiny_model).values()) == {"sdpa"}


def test_set_attention_switches_aggregator_blocks_and_config(tiny_model: VGGT) -> None:
    assert set_attention(tiny_model, "int8") is tiny_model
    kinds = _kinds(tiny_model)
    agg = {n: k for n, k in kinds.items() if n.startswith(("aggregator.frame_blocks", "aggregator.global_blocks"))}
    assert agg and set(agg.values()) == {"int8"}
    assert {k for n, k in kinds.items() if n not in agg} == {"sdpa"}  # camera head trunk, patch-embed ViT untouched
    assert tiny_model.config.aggregator.attention == "int8"
    assert tiny_model.config.to_dict()["aggregator"]["attention"] == "int8"
    set_attention(tiny_model, None)  # None: unchanged
    assert tiny_model.config.aggregator.attention == "int8"
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(tiny_model, "fp8")
    with pytest.raises(ValueError, match="no aggregator"):
        set_attention(torch.nn.Linear(2, 2), "int8")


def test_int8_forward_close_and_switching_back_is_exact(tiny_model: VGGT) -> None:
    images = _images()
    with torch.no_grad():
        exact = tiny_model(images)
        set_attention(tiny_model, "int8")
        q8 = tiny_model(images)
        set_attention(tiny_model, "sdpa")
        again = tiny_model(images)
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(again[key], exact[key]), key
        assert not torch.equal(q8[key], exact[key]), key  # the int8 path really ran
        err = float((q8[key] - exact[key]).norm() / exact[key].norm())
        assert err < 0.05, f"{key}: {err:.3f}"


def test_int8_uses_the_registry_kernel(tiny_model: VGGT, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    ref = registry.get_kernel("attention_int8", "cpu")
    assert ref is not None

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return ref(q, k, v)

    monkeypatch.setitem(registry._KERNELS, ("attention_int8", "cpu"), spy)
    set_attention(tiny_model, "int8")
    with torch.no_grad():
        tiny_model(_images())
    depth = tiny_model.config.aggregator.depth
    assert len(calls) == 2 * depth  # every frame and global block, nothing else
    heads = tiny_model.config.aggregator.num_heads
    assert {c[1] for c in calls} == {heads}


def test_int8_gradients_are_exact_attentions() -> None:
    torch.manual_seed(0)
    att = Attention(32, num_heads=2, qk_norm=True, attention="int8")
    x = torch.randn(2, 20, 32, requires_grad=True)
    att(x).square().sum().backward()
    g_int8 = x.grad.clone()
    x.grad = None
    att.attention = "sdpa"
    att(x).square().sum().backward()
    # straight-through: the forward is int8, the backward exact attention's (at the int8 forward's output)
    assert float((g_int8 - x.grad).norm() / x.grad.norm()) < 0.05
    with pytest.raises(ValueError):
        Attention(32, attention="flash")


def test_config_round_trip_and_validation() -> None:
    cfg = VGGTConfig.from_dict(tiny_config_dict(attention="int8"))
    assert cfg.aggregator.attention == "int8"
    full = cfg.to_dict()
    assert VGGTConfig.from_dict(json.loads(json.dumps(full))) == cfg
    model = VGGT(cfg)
    assert set(_kinds(model.aggregator.global_blocks).values()) == {"int8"}
    old = tiny_config_dict()
    old["aggregator"].pop("attention", None)  # configs written before the field: exact attention
    assert VGGTConfig.from_dict(old).aggregator.attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        VGGTConfig.from_dict(tiny_config_dict(attention="fp8"))


def test_quantized_checkpoint_records_attention(tiny_model: VGGT, tmp_path: object) -> None:
    from quantvggt.quant import get_recipe, load_quantized, quantize_, save_quantized

    quantize_(tiny_model, get_recipe("rtn-w4a4"))
    set_attention(tiny_model, "int8")
    out = save_quantized(tiny_model, tmp_path / "ckpt")  # type: ignore[operator]
    assert json.loads((out / "quant.json").read_text())["model_config"]["aggregator"]["attention"] == "int8"
    loaded = load_quantized(out)
    assert loaded.config.aggregator.attention == "int8"
    assert set(_kinds(loaded.aggregator.frame_blocks).values()) == {"int8"}
    images = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["depth"], tiny_model(images)["depth"])


def test_sdpa_mode_is_plain_sdpa() -> None:
    torch.manual_seed(1)
    att = Attention(32, num_heads=2).eval()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        qkv = att.qkv(x).reshape(1, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
        want = att.proj(F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(1, 9, 32))
        assert torch.equal(att(x), want)


def test_scene_report_records_attention(synth_scenes: object) -> None:
    from quantvggt.reconstruct import ReconstructionOptions, reconstruct_scene
    from tests.conftest import sane_tiny_model

    model = set_attention(sane_tiny_model(), "int8")
    pred = reconstruct_scene(model, synth_scenes / "scene_000", ReconstructionOptions())  # type: ignore[operator]
    assert pred.report["attention"] == "int8"

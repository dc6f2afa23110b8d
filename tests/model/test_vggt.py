"""Model structure and numerical parity with upstream VGGT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantvggt.model import VGGT, VGGTConfig
from quantvggt.model.loading import build_model, read_state_dict
from tests.conftest import PARITY, SPEC_1B, require, tiny_config_dict


def test_default_config_matches_official_state_dict_layout() -> None:
    spec = json.loads(require(SPEC_1B).read_text())
    with torch.device("meta"):
        model = VGGT(VGGTConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(spec["keys"]), sorted(set(ours) ^ set(spec["keys"]))[:10]
    assert ours == spec["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == spec["num_params"]


def test_official_layout_loads_strictly_on_meta() -> None:
    spec = json.loads(require(SPEC_1B).read_text())["keys"]
    sd = {k: torch.empty(v, device="meta") for k, v in spec.items()}
    model = build_model(VGGTConfig(), sd, "spec")
    assert model.aggregator.frame_blocks[23].attn.qkv.weight.shape == (3072, 1024)


def test_parity_with_upstream_fixture() -> None:
    cfg = json.loads(require(PARITY / "config.json").read_text())
    model = build_model(VGGTConfig.from_dict(cfg["config"]), read_state_dict(PARITY / "weights.safetensors"))
    images = torch.from_numpy(np.load(PARITY / "inputs.npz")["images"])
    ref = np.load(PARITY / "outputs.npz")
    with torch.no_grad():
        out = model(images)
    assert set(ref.files) <= set(out)
    for key in ref.files:
        got, want = out[key].numpy(), ref[key]
        assert got.shape == want.shape, key
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, f"{key}: relative error {err:.2e}"


def test_config_round_trip_and_defaults_filled() -> None:
    d = json.loads(require(PARITY / "config.json").read_text())["config"]
    cfg = VGGTConfig.from_dict(d)
    full = cfg.to_dict()
    assert full["track_head"] is None
    assert full["camera_head"]["fl_act"] == "relu"  # default filled in
    assert full["aggregator"]["qkv_bias"] is True
    assert VGGTConfig.from_dict(full) == cfg
    assert VGGTConfig.from_dict(json.loads(json.dumps(full))).to_dict() == full


def test_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        VGGTConfig.from_dict({"aggregator": {"embed_dimm": 3}})
    with pytest.raises(ValueError, match="dim_in"):
        VGGTConfig.from_dict(
            {"aggregator": {"embed_dim": 64, "num_heads": 4, "patch_embed": "conv"}, "camera_head": {"dim_in": 64}}
        )
    with pytest.raises(ValueError, match="divisible"):
        VGGTConfig.from_dict({"aggregator": {"depth": 5, "aa_block_size": 2}})


def test_forward_shapes_4d_and_5d(tiny_model: VGGT) -> None:
    x = torch.rand(3, 3, 28, 42)
    with torch.no_grad():
        a = tiny_model(x)
        b = tiny_model(torch.stack([x, x]))
    assert a["pose_enc"].shape == (1, 3, 9)
    assert a["depth"].shape == (1, 3, 28, 42, 1)
    assert a["world_points"].shape == (1, 3, 28, 42, 3)
    assert b["depth_conf"].shape == (2, 3, 28, 42)
    torch.testing.assert_close(b["depth"][1], a["depth"][0], rtol=1e-4, atol=1e-5)
    assert "track" not in a


def test_only_needed_layers_are_kept(tiny_model: VGGT) -> None:
    tiny_model.point_head = None
    tiny_model.depth_head.cfg.intermediate_layer_idx = [0, 1, 1, 3]
    tokens, _ = tiny_model.aggregator(torch.rand(1, 2, 3, 28, 28), keep_layers=tiny_model.needed_layers(False))
    assert [t is not None for t in tokens] == [True, True, False, True]


def test_track_head_runs_and_first_frame_is_query() -> None:
    d = tiny_config_dict(depth=24)
    for h in ("depth_head", "point_head"):
        d[h]["intermediate_layer_idx"] = [4, 11, 17, 23]
    d["track_head"] = {"dim_in": 128, "features": 32, "hidden_size": 64, "corr_levels": 3}
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(d)).eval()
    q = torch.tensor([[5.0, 7.0], [20.0, 30.0]])
    with torch.no_grad():
        out = model(torch.rand(3, 3, 42, 56), query_points=q)
    assert out["track"].shape == (1, 3, 2, 2)
    assert out["vis"].shape == (1, 3, 2) and out["conf"].shape == (1, 3, 2)
    torch.testing.assert_close(out["track"][0, 0], q)


def test_track_head_needs_depth_24() -> None:
    d = tiny_config_dict()
    d["track_head"] = {"dim_in": 128}
    with pytest.raises(ValueError, match="too shallow"):
        VGGT(VGGTConfig.from_dict(d))


def test_vit_patch_embed_interpolates_positions_for_non_square_input() -> None:
    d = {
        "aggregator": {
            "img_size": 70,
            "embed_dim": 384,
            "depth": 2,
            "num_heads": 6,
            "patch_embed": "dinov2_vits14_reg",
        },
        "camera_head": {"dim_in": 768, "trunk_depth": 1, "num_heads": 4},
        "depth_head": {
            "dim_in": 768,
            "features": 32,
            "out_channels": [16, 32, 64, 64],
            "intermediate_layer_idx": [0, 1, 1, 1],
        },
        "point_head": None,
    }
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.from_dict(d)).eval()
    vit = model.aggregator.patch_embed
    x = torch.rand(1, 3, 70, 70)
    tok = vit.prepare_tokens(x)
    assert vit.interpolate_pos_encoding(tok[:, : 1 + 25], 70, 70) is vit.pos_embed  # native size: table as is
    pe = vit.interpolate_pos_encoding(torch.zeros(1, 1 + 24, 384), 56, 84)  # 4 x 6 patches
    assert pe.shape == (1, 25, 384)
    torch.testing.assert_close(pe[:, 0], vit.pos_embed[:, 0])
    with torch.no_grad():
        out = model(torch.rand(2, 3, 56, 84))
    assert out["depth"].shape == (1, 2, 56, 84, 1)
    assert vit(torch.rand(2, 3, 56, 84)).shape == (2, 24, 384)

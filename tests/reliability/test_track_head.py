"""Track head parity: the feature extractor's positional embedding is wired the way upstream's is.

Upstream's current ``TrackHead(..., pos_embed=True)`` passes the flag to its ``DPTHead``, which adds
``0.1 * position_grid_to_embed(create_uv_grid(w, h, aspect=W/H), C)`` after each token projection and after the
final upsampling (``_apply_pos_embed``); releases before upstream's track-head fix hard-coded ``pos_embed=False``.
``TrackHeadConfig.pos_embed`` (default True) selects it; the embedding is a fixed table, so no parameters change.

The tracker amplifies float32 noise ~20x per refinement iteration (the issue measured, with seeded VGGT-1B-like
weights, track/vis/conf still 8.5e-4/6.7e-3/4.5e-3 from upstream's in float32 once wired alike), so these tests
run in float64, where only real differences survive, and check the embedding itself to float32 precision.

How to add a case: append a dict of ``TrackHeadConfig`` overrides to ``CONFIGS`` (and, for another image size,
a ``(H, W)`` to ``SIZES``); every test runs for every row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantvggt.model import VGGTConfig
from quantvggt.model.config import TrackHeadConfig
from quantvggt.model.track_head import TrackHead
from quantvggt.testing import tiny_config_dict

PATCH, PSI, DIM = 14, 2, 64  # patch size, special tokens before the patches, token width (dim_in)
CONFIGS = [
    {"features": 32, "hidden_size": 64, "corr_levels": 3, "iters": 2},
    {"features": 16, "hidden_size": 32, "corr_levels": 2, "iters": 1, "predict_conf": False},
]
SIZES = [(28, 42)]  # H != W, so the aspect-ratio part of the UV grid matters


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny tensors: a second intra-op thread only adds synchronisation (40x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_head(overrides: dict, pos_embed: bool, seed: int = 0) -> TrackHead:
    """A seeded float64 track head reading four token layers."""
    torch.manual_seed(seed)
    cfg = TrackHeadConfig(dim_in=DIM, patch_size=PATCH, pos_embed=pos_embed, **overrides)
    return TrackHead(cfg, intermediate_layer_idx=(0, 1, 2, 3)).double().eval()


def make_inputs(hw: tuple[int, int], S: int = 2) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Token layers, images and query points for ``S`` frames of size ``hw``."""
    g = torch.Generator().manual_seed(1)
    H, W = hw
    n_tok = PSI + (H // PATCH) * (W // PATCH)
    tokens = [torch.randn(1, S, n_tok, DIM, generator=g, dtype=torch.float64) for _ in range(4)]
    images = torch.rand(1, S, 3, H, W, generator=g, dtype=torch.float64)
    query = torch.tensor([[[3.0, 4.0], [20.0, 11.0], [35.0, 22.0]]], dtype=torch.float64)
    return tokens, images, query


def upstream_pos_embed(h: int, w: int, channels: int, aspect: float) -> np.ndarray:
    """Upstream's ``_apply_pos_embed`` table ``[C, h, w]`` (ratio 0.1), written out independently in numpy."""
    diag = (aspect**2 + 1) ** 0.5
    span_x, span_y = aspect / diag, 1 / diag
    u = np.linspace(-span_x * (w - 1) / w, span_x * (w - 1) / w, w)
    v = np.linspace(-span_y * (h - 1) / h, span_y * (h - 1) / h, h)
    uu, vv = np.meshgrid(u, v)  # [h, w]

    def sincos(pos: np.ndarray, dim: int) -> np.ndarray:
        omega = 1.0 / 100.0 ** (np.arange(dim // 2) / (dim / 2))
        arg = pos[..., None] * omega
        return np.concatenate([np.sin(arg), np.cos(arg)], axis=-1)

    emb = np.concatenate([sincos(uu, channels // 2), sincos(vv, channels // 2)], axis=-1)
    return 0.1 * emb.transpose(2, 0, 1)


def test_default_is_upstreams_and_configs_round_trip() -> None:
    assert TrackHeadConfig().pos_embed is True
    assert VGGTConfig.from_upstream().track_head.pos_embed is True  # type: ignore[union-attr]
    d = tiny_config_dict(depth=24)
    d["track_head"] = {"dim_in": 128}  # a config saved before the field existed
    assert VGGTConfig.from_dict(d).track_head.pos_embed is True  # type: ignore[union-attr]
    d["track_head"]["pos_embed"] = False
    cfg = VGGTConfig.from_dict(d)
    assert VGGTConfig.from_dict(cfg.to_dict()).track_head.pos_embed is False  # type: ignore[union-attr]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_pos_embed_adds_no_parameters(overrides: dict) -> None:
    on, off = make_head(overrides, True), make_head(overrides, False)
    assert on.feature_extractor.cfg.pos_embed and not off.feature_extractor.cfg.pos_embed
    sd_on, sd_off = on.state_dict(), off.state_dict()
    assert {k: v.shape for k, v in sd_on.items()} == {k: v.shape for k, v in sd_off.items()}
    off.load_state_dict(sd_on, strict=True)  # checkpoints written either way load either way


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("overrides", CONFIGS)
def test_track_outputs_depend_on_pos_embed(overrides: dict, hw: tuple[int, int]) -> None:
    tokens, images, query = make_inputs(hw)
    outs = {}
    with torch.no_grad():
        for flag in (True, False):
            tracks, vis, conf = make_head(overrides, flag)(tokens, images, PSI, query)
            outs[flag] = [tracks[-1], vis] + ([conf] if conf is not None else [])
        again = make_head(overrides, True)(tokens, images, PSI, query)
    torch.testing.assert_close(again[0][-1], outs[True][0], rtol=0, atol=1e-9)  # float64: deterministic
    for name, a, b in zip(("track", "vis", "conf"), outs[True], outs[False]):
        assert float((a - b).abs().max()) > 1e-4, f"{name} ignores pos_embed: the flag is not wired"
    torch.testing.assert_close(outs[True][0][:, 0], query)  # the query frame is still the query points


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("pos_embed", [True, False])
def test_feature_extractor_adds_upstreams_embedding(overrides: dict, hw: tuple[int, int], pos_embed: bool) -> None:
    head = make_head(overrides, pos_embed)
    dpt = head.feature_extractor
    tokens, images, _ = make_inputs(hw)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i in range(4):
        hooks.append(dpt.projects[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"proj{i}", out)))
        hooks.append(dpt.resize_layers[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"in{i}", a[0])))
    hooks.append(dpt.scratch.output_conv1.register_forward_hook(lambda m, a, out: seen.__setitem__("fused", out)))
    with torch.no_grad():
        feats = dpt(tokens, images, PSI)
    for h in hooks:
        h.remove()
    H, W = hw
    for i in range(4):
        added = (seen[f"in{i}"] - seen[f"proj{i}"])[0].numpy()
        want = upstream_pos_embed(H // PATCH, W // PATCH, added.shape[0], W / H) if pos_embed else 0 * added
        np.testing.assert_allclose(added, want, atol=1e-6, err_msg=f"after projection {i}")
    h2, w2 = feats.shape[-2:]
    assert (h2, w2) == (H // 2, W // 2)  # down_ratio 2, as upstream's track head
    upsampled = F.interpolate(seen["fused"], size=(h2, w2), mode="bilinear", align_corners=True)
    added = (feats[0] - upsampled)[0].numpy()
    want = upstream_pos_embed(h2, w2, added.shape[0], W / H) if pos_embed else 0 * added
    np.testing.assert_allclose(added, want, atol=1e-6, err_msg="after the final upsampling")

"""Training loop: runs, checkpoints atomically, resumes exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantvggt.model import load_vggt
from quantvggt.train.data import normalise, render_scene
from quantvggt.train.loop import TrainConfig, main
from quantvggt.train.losses import camera_loss, conf_regression_loss


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=1,
        frames=(2, 3),
        width=56,
        height=42,
        pool_scenes=2,
        pool_frames=4,
        save_every=2,
        log_every=1,
        warmup=2,
        val_samples=3,
        val_every=2,
    )


def test_train_and_resume(tmp_path: Path) -> None:
    main(tmp_path, _cfg(3))
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (tmp_path / "loss.png").is_file() and not list(tmp_path.glob("*.tmp"))
    val = [json.loads(x) for x in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [2, 3]  # every val_every steps and at the last step
    assert all(r["val_camera"] > 0 and r["val_camera_const"] > 0 and r["val_depth_absrel"] > 0 for r in val)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert int(state["step"]) == 3
    # resuming continues the step count (the saved config wins; only steps is raised)
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    cfg["steps"] = 5
    (tmp_path / "train_config.json").write_text(json.dumps(cfg))
    main(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    model = load_vggt(str(tmp_path))  # the checkpoint folder is a loadable model, at its training resolution
    assert model.config.aggregator.embed_dim == 128 and model.image_size == 56


def test_normalised_sample_is_reference_relative() -> None:
    scene = render_scene(5, 4, 56, 42)
    s = normalise(scene, [2, 0, 3])
    assert s["images"].shape == (3, 3, 42, 56)
    torch.testing.assert_close(s["pose_enc"][0, :3], torch.zeros(3), atol=1e-5, rtol=0)  # first camera at origin
    torch.testing.assert_close(s["pose_enc"][0, 3:7].abs(), torch.tensor([0, 0, 0, 1.0]), atol=1e-5, rtol=0)
    pts = s["world_points"][s["valid"]]
    assert abs(float(pts.norm(dim=-1).mean()) - 1.0) < 1e-4


def test_losses_zero_error_and_gradients() -> None:
    gt = torch.randn(1, 3, 9)
    assert float(camera_loss([gt.clone()], gt)) == 0.0
    q = gt.clone()
    q[..., 3:7] *= -1  # q and -q are the same rotation
    assert float(camera_loss([q], gt)) == 0.0
    pred = torch.randn(1, 2, 5, 6, 3, requires_grad=True)
    conf = torch.ones(1, 2, 5, 6) * 2
    loss = conf_regression_loss(pred, conf, pred.detach() + 1, torch.ones(1, 2, 5, 6, dtype=torch.bool))
    loss.backward()
    assert pred.grad is not None and float(loss) > 0


def test_init_from_export_and_parallel_data(tmp_path: Path) -> None:
    """A run started from another's weights begins where it left off; export writes a loadable float16 model."""
    from safetensors.torch import load_file

    from quantvggt.train.loop import export_model

    cfg = _cfg(2)
    cfg.model["aggregator"]["patch_embed"] = "vit_tiny14_reg"  # absolute positions in the tokens
    main(tmp_path / "a", cfg)
    exported = export_model(tmp_path / "a", tmp_path / "a-export")
    sd = load_file(str(exported / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    assert json.loads((exported / "config.json").read_text())["image_size"] == 56
    m = load_vggt(str(exported))
    assert m.config.aggregator.patch_embed == "vit_tiny14_reg"
    src = load_file(str(tmp_path / "a" / "model.safetensors"))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, src[k].half().float())  # float16 round trip only
    cfg2 = _cfg(1)
    cfg2.model = cfg.model
    cfg2.init_from = str(exported)
    main(tmp_path / "b", cfg2, workers=2)  # DataLoader worker processes
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert any(not torch.equal(b[k], src[k]) for k in src)  # one step was taken from the initial weights
    assert max(float((b[k] - src[k]).abs().max()) for k in src) < 0.05
    other = _cfg(1)  # a different architecture cannot start from these weights
    other.init_from = str(exported)
    with pytest.raises(ValueError, match="config differs"):
        main(tmp_path / "c", other)
    other.init_partial = True  # ... unless asked to take what matches: all but the patch embed
    other.lr = 0.0  # so the saved weights are exactly the initial ones
    main(tmp_path / "c", other)
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    shared = [k for k in c if k in src and c[k].shape == src[k].shape]
    assert "aggregator.frame_blocks.0.attn.qkv.weight" in shared
    assert all(torch.equal(c[k], src[k].half().float()) for k in shared)
    assert "aggregator.patch_embed.proj.weight" in c and not any(
        k.startswith("aggregator.patch_embed.proj") for k in src
    )


def test_lr_schedule_by_time() -> None:
    from quantvggt.train.loop import _lr_at

    cfg = TrainConfig(steps=1000, warmup=10, lr=1.0)
    assert _lr_at(5, cfg) == pytest.approx(0.6)
    assert _lr_at(10, cfg) == pytest.approx(1.0)
    assert _lr_at(10, cfg, progress=1.0) == pytest.approx(0.1)  # time ran out: fully decayed
    assert _lr_at(1000, cfg, progress=0.0) == pytest.approx(0.1)  # steps ran out first
    with pytest.raises(ValueError, match="max_minutes"):
        main("/nonexistent", cfg, schedule_by_time=True)


def test_pool_refresh_replaces_scenes_with_unseen_ones() -> None:
    import numpy as np

    from quantvggt.train.data import ScenePool

    fixed = ScenePool(3, 3, 28, 28, seed=0)
    pool = ScenePool(3, 3, 28, 28, seed=0, refresh_every=2)
    before = [s.images.copy() for s in pool.scenes]
    rng = np.random.default_rng(0)
    for _ in range(4):
        pool.sample(rng, 2)
    changed = [not np.array_equal(a, s.images) for a, s in zip(before, pool.scenes)]
    assert sum(changed) == 2  # 4 samples served, one new scene every 2
    again = ScenePool(3, 3, 28, 28, seed=0, refresh_every=2)
    rng = np.random.default_rng(0)
    for _ in range(4):
        again.sample(rng, 2)
    assert all(np.array_equal(a.images, b.images) for a, b in zip(pool.scenes, again.scenes))  # deterministic
    other = ScenePool(3, 3, 28, 28, seed=0, refresh_every=2, stream=100)  # a resumed run draws other new scenes
    rng = np.random.default_rng(0)
    for _ in range(4):
        other.sample(rng, 2)
    fresh = [i for i, c in enumerate(changed) if c]
    assert all(not np.array_equal(pool.scenes[i].images, other.scenes[i].images) for i in fresh)
    assert all(not np.array_equal(pool.scenes[i].images, fixed.scenes[i].images) for i in fresh)

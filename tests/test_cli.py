"""The console script."""

from __future__ import annotations

import subprocess
import sys


def test_predict_runs_on_bundled_samples() -> None:
    from quantvggt.cli import ASSETS

    imgs = [str(p) for p in sorted((ASSETS / "samples").glob("*.png"))]
    out = subprocess.run(
        [sys.executable, "-m", "quantvggt.cli", "predict", *imgs, "--model", "demo-random"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "frame_00.png" in out.stdout and "frame_02.png" in out.stdout
    assert "random weights" in out.stdout


def test_predict_reports_bad_image_clearly(tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-m", "quantvggt.cli", "predict", str(bad), "--model", "demo-random"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "broken.png" in out.stderr and "empty" in out.stderr


def test_quantize_command_writes_checkpoint(tmp_path) -> None:
    import json as _json

    import torch
    from safetensors.torch import save_file

    from quantvggt.model import VGGT, VGGTConfig
    from tests.conftest import tiny_config_dict

    torch.manual_seed(0)
    m = VGGT(VGGTConfig.from_dict(tiny_config_dict()))
    (tmp_path / "model").mkdir()
    save_file(m.state_dict(), str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "config.json").write_text(_json.dumps(m.config.to_dict()))
    from quantvggt.cli import ASSETS

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantvggt.cli",
            "quantize",
            "--model",
            str(tmp_path / "model"),
            "--calibration",
            str(ASSETS / "samples"),
            "--recipe",
            "quantvggt-w4a4",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "q"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q" / "quant.json").is_file()
    meta = _json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["calibration_ids"][0].startswith("samples:frame_00.png")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantvggt.cli",
            "predict",
            str(ASSETS / "samples" / "frame_00.png"),
            str(ASSETS / "samples" / "frame_01.png"),
            "--model",
            str(tmp_path / "q"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "frame_01.png" in out.stdout


def test_synth_and_reconstruct_commands(tmp_path) -> None:
    import json as _json

    from safetensors.torch import save_file

    from tests.conftest import sane_tiny_model

    m = sane_tiny_model()
    (tmp_path / "model").mkdir()
    save_file(m.state_dict(), str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "config.json").write_text(_json.dumps({**m.config.to_dict(), "image_size": 112}))

    def run(*a):
        return subprocess.run([sys.executable, "-m", "flows.cli", *a], capture_output=True, text=True, timeout=600)

    out = run("synth", str(tmp_path / "scenes"), "--scenes", "2", "--frames", "3", "--size", "112x84")
    assert out.returncode == 0, out.stderr
    (tmp_path / "scenes" / "scene_empty").mkdir()
    out = run(
        "reconstruct",
        str(tmp_path / "scenes" / "scene_000"),
        str(tmp_path / "scenes" / "scene_empty"),
        str(tmp_path / "scenes" / "scene_001"),
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "out"),
        "--max-points",
        "100",
        "--text",
    )
    assert out.returncode == 1  # one scene failed, the others were still reconstructed
    assert "scene_empty: FAILED" in out.stdout and "2 of 3 scenes reconstructed" in out.stdout
    assert (tmp_path / "out" / "scene_001" / "sparse" / "0" / "images.txt").is_file()

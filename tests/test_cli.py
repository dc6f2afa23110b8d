"""The console script."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_prints_predictions() -> None:
    out = subprocess.run([sys.executable, "-m", "quantvggt.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "frame_00.png" in out.stdout and "frame_02.png" in out.stdout
    assert "random weights" in out.stdout


def test_predict_reports_bad_image_clearly(tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "quantvggt.cli", "predict", str(bad), "--model", "demo-random"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "broken.png" in out.stderr and "empty" in out.stderr

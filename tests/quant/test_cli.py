"""``quantvggt quantize --budget`` / ``--layer-bits``: mixed precision from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantvggt.cli import ASSETS
from quantvggt.model import VGGT, VGGTConfig
from quantvggt.testing import tiny_config_dict


def _quantize(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "quantvggt.cli",
        "quantize",
        "--model",
        str(tmp_path / "model"),
        "--calibration",
        str(ASSETS / "samples"),
        "--recipe",
        "rtn-w4a4",
        "--scope",  # the aggregator alone: the budget then has to mix widths inside it
        "aggregator",
        "--frames",
        "2",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_budget_then_reuse_of_the_map(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = VGGT(VGGTConfig.from_dict({**tiny_config_dict(), "image_size": 56}))  # small inputs keep the test fast
    (tmp_path / "model").mkdir()
    save_file(m.state_dict(), str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "config.json").write_text(json.dumps(m.config.to_dict()))
    out = _quantize(tmp_path, "--budget", "1.15x", "--out", str(tmp_path / "q"))
    assert out.returncode == 0, out.stderr
    assert "mixed precision: " in out.stdout and "aggregator" in out.stdout
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    bits = meta["config"]["layer_bits"]
    assert len({tuple(v) for v in bits.values()}) > 1  # a real mix of widths
    assert meta["report"]["compression_vs_fp16"] >= 1.15
    again = _quantize(tmp_path, "--layer-bits", str(tmp_path / "q"), "--out", str(tmp_path / "q2"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "q2" / "quant.json").read_text())["config"]["layer_bits"] == bits
    bad = _quantize(tmp_path, "--budget", "0.5", "--out", str(tmp_path / "q3"))
    assert bad.returncode == 2 and "budget must be > 1x" in bad.stderr

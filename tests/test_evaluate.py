"""Evaluation table over recipes on synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

from quantvggt import evaluate
from quantvggt.reconstruct import ReconstructionOptions
from tests.conftest import sane_tiny_model


def test_table_written_with_all_columns(synth_scenes: Path, tmp_path: Path) -> None:
    def loader():
        m = sane_tiny_model()
        m.config.image_size = 112
        return m

    calib = [{"id": "c0", "images": __import__("torch").rand(3, 3, 84, 112)}]
    out = evaluate.main(
        loader, synth_scenes, tmp_path, ["fp", "rtn-w4a4"], calib, options=ReconstructionOptions(max_frames=4)
    )
    table = (out / "table.md").read_text()
    assert "| fp |" in table and "| rtn-w4a4 |" in table and "% of FP AUC@30" in table
    res = json.loads((out / "results.json").read_text())["results"]
    assert res[0]["compression_vs_fp16"] == 1.0 and res[1]["compression_vs_fp16"] > 1.0
    for r in res:
        assert 0.0 <= r["auc@30"] <= 1.0 and r["abs_rel"] >= 0 and r["point_accuracy"] >= 0
    assert (out / "auc.png").stat().st_size > 1000 and (out / "table.csv").read_text().startswith("recipe,")


def test_recipe_specs_with_scope_and_budget(synth_scenes: Path, tmp_path: Path) -> None:
    assert evaluate.parse_recipe_spec("quantvggt-w4a4") == ("quantvggt-w4a4", None, None)
    assert evaluate.parse_recipe_spec("rtn-w4a4@aggregator+camera_head@1.2x") == (
        "rtn-w4a4",
        ("aggregator", "camera_head"),
        1.2,
    )

    def loader():
        m = sane_tiny_model()
        m.config.image_size = 112
        return m

    calib = [{"id": "c0", "images": __import__("torch").rand(3, 3, 84, 112)}]
    specs = ["rtn-w4a4@aggregator+camera_head", "rtn-w4a4@aggregator+camera_head@1.2x"]
    out = evaluate.main(loader, synth_scenes, tmp_path, specs, calib, options=ReconstructionOptions(max_frames=4))
    res = json.loads((out / "results.json").read_text())["results"]
    assert res[1]["compression_vs_fp16"] >= 1.2 and res[1]["compression_vs_fp16"] < res[0]["compression_vs_fp16"]
    assert (out / "size_vs_auc.png").stat().st_size > 1000

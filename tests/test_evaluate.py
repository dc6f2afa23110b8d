"""Evaluation table over recipes on synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantvggt import evaluate
from quantvggt.reconstruct import ReconstructionOptions
from tests.conftest import sane_tiny_model


def loader():
    """The seeded tiny model at 112 px, as evaluate.main loads it once per table."""
    m = sane_tiny_model()
    m.config.image_size = 112
    return m


calib = [{"id": "c0", "images": torch.rand(3, 3, 84, 112, generator=torch.Generator().manual_seed(0))}]


def test_table_written_with_all_columns(synth_scenes: Path, tmp_path: Path) -> None:
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

    specs = ["rtn-w4a4@aggregator+camera_head", "rtn-w4a4@aggregator+camera_head@1.2x"]
    out = evaluate.main(loader, synth_scenes, tmp_path, specs, calib, options=ReconstructionOptions(max_frames=4))
    res = json.loads((out / "results.json").read_text())["results"]
    assert res[1]["compression_vs_fp16"] >= 1.2 and res[1]["compression_vs_fp16"] < res[0]["compression_vs_fp16"]
    assert (out / "size_vs_auc.png").stat().st_size > 1000


def test_an_interrupted_table_resumes(synth_scenes: Path, tmp_path: Path, monkeypatch) -> None:
    opts = ReconstructionOptions(max_frames=4)
    evaluate.main(loader, synth_scenes, tmp_path, ["fp"], calib, options=opts)
    measured: list[int] = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: measured.append(1) or real(*a, **k))
    evaluate.main(loader, synth_scenes, tmp_path, ["fp", "rtn-w4a4"], calib, options=opts)
    assert len(measured) == 1  # fp reused, rtn measured
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["recipe"] for r in rows] == ["fp", "rtn-w4a4"]
    evaluate.main(loader, synth_scenes, tmp_path, ["fp"], calib, options=opts, overwrite=True)
    assert len(measured) == 2


def test_an_unreachable_budget_is_a_row_not_a_crash(synth_scenes: Path, tmp_path: Path) -> None:
    specs = ["rtn-w4a4@aggregator@9x", "fp"]
    out = evaluate.main(loader, synth_scenes, tmp_path, specs, calib, options=ReconstructionOptions(max_frames=4))
    rows = json.loads((out / "results.json").read_text())["results"]
    assert "budget unreachable" in rows[0]["error"] and rows[1]["recipe"] == "fp"
    table = (out / "table.md").read_text()
    assert "| fp |" in table and "- rtn-w4a4@aggregator@9x: not measured, budget unreachable" in table

"""Noise-Filtered Diverse Sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantvggt.calib import nfds


def _rows(n: int, group: str = "g", seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = i % 3  # three well separated feature clusters
        out.append(
            {
                "sample_id": f"{group}{i}",
                "scene": f"/s/{group}{i}",
                "group": group,
                "frames": ["a.png", "b.png"],
                "layers": ["l0", "l1"],
                "layer_mean": [float(rng.normal(0, 0.01)), float(rng.normal(1, 0.01))],
                "layer_std": [float(rng.normal(1, 0.01)), float(rng.normal(2, 0.01))],
                "feature": (np.array([0.9, 0.5, 0.1])[c] + rng.normal(0, 0.01, 4)).tolist(),
            }
        )
    return out


def test_iqr_filter_on_crafted_statistics() -> None:
    rows = _rows(12)
    rows[4]["layer_std"][1] = 9.0  # planted: one deep-layer std far outside the fence
    rows[7]["layer_mean"][0] = -3.0
    out = nfds.select(rows, n_clusters=3, per_cluster=2)
    flagged = {r["sample_id"] for r in out if r["outlier"]}
    assert flagged == {"g4", "g7"}
    assert "l1 std=9" in next(r for r in out if r["sample_id"] == "g4")["outlier_reason"]
    assert not any(r["selected"] for r in out if r["outlier"])


def test_small_groups_are_not_filtered() -> None:
    rows = _rows(3, group="tiny")
    rows[0]["layer_std"][0] = 100.0
    assert not any(r["outlier"] for r in nfds.select(rows, n_clusters=2, per_cluster=1))


def test_every_cluster_contributes_and_top_up() -> None:
    out = nfds.select(_rows(30), n_clusters=3, per_cluster=4)
    sel = [r for r in out if r["selected"]]
    assert len(sel) == 12
    assert {r["cluster"] for r in sel} == {0, 1, 2}
    assert all(sum(r["cluster"] == c for r in sel) == 4 for c in range(3))
    # a short cluster is topped up from the others
    rows = _rows(30)
    for r in rows[:28]:
        r["feature"] = [0.5, 0.5, 0.5, 0.5]
    out = nfds.select(rows, n_clusters=3, per_cluster=4)
    assert sum(r["selected"] for r in out) == 12


def test_selection_is_deterministic_and_seed_dependent() -> None:
    a = nfds.select(_rows(40), 3, 2, seed=1)
    b = nfds.select(_rows(40), 3, 2, seed=1)
    c = nfds.select(_rows(40), 3, 2, seed=2)
    pick = lambda rows: [r["sample_id"] for r in rows if r["selected"]]
    assert pick(a) == pick(b)
    assert pick(a) != pick(c)


def test_manifest_round_trip(tmp_path: Path) -> None:
    rows = nfds.select(_rows(10), 2, 2)
    path = nfds.write_manifest(rows, tmp_path / "m.parquet")
    back = nfds.read_manifest(path)
    assert [r["sample_id"] for r in back] == [r["sample_id"] for r in rows]
    assert back[3]["feature"] == pytest.approx(rows[3]["feature"])
    assert [r["selected"] for r in back] == [r["selected"] for r in rows]


def test_end_to_end_filters_noise_scenes(synth_scenes: Path, tmp_path: Path, tiny_model) -> None:
    from quantvggt import synth

    pool = synth.main(tmp_path / "pool" / "indoor", scenes=6, frames=4, seed=3, size=(56, 42))
    noise = tmp_path / "pool" / "indoor" / "zz_noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((42, 56, 3)) ** 8 * 255).astype(np.uint8)).save(noise / f"n{i}.png")
    tiny_model.config.image_size = 56
    out = nfds.main(tiny_model, [tmp_path / "pool"], tmp_path / "sel.parquet", frames=4, n_clusters=2, per_cluster=2)
    rows = nfds.read_manifest(out)
    assert len(rows) == 7 and sum(r["selected"] for r in rows) == 4
    assert (tmp_path / "sel.png").stat().st_size > 1000
    assert all(r["group"] == "indoor" for r in rows)
    noise_row = next(r for r in rows if r["sample_id"].startswith("zz_noise"))
    assert noise_row["outlier"] and not noise_row["selected"] and "outside IQR fence" in noise_row["outlier_reason"]
    items = nfds.load_selected(out, image_size=56)
    assert len(items) == 4 and items[0]["images"].shape == (4, 3, 42, 56)
    # statistics are a pure function of the sample
    c = nfds.candidate_pool([pool], frames=4)[0]
    a = nfds.sample_stats(tiny_model, nfds.load_candidate(c, 56))
    b = nfds.sample_stats(tiny_model, nfds.load_candidate(c, 56))
    assert a == b and len(a["feature"]) == 3 and len(a["layer_mean"]) == 8

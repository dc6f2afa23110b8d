"""Export writers: one signature, a registry, and nerfstudio's transforms.json agreeing with the COLMAP model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantvggt import colmap as cm
from quantvggt import export
from quantvggt.export import check_formats, register_writer, write_workspace
from quantvggt.options import ExportOptions
from tests.test_colmap import gt_prediction, sources


def test_transforms_json_projects_points_where_the_colmap_model_does(synth_scenes: Path, tmp_path: Path) -> None:
    scene = synth_scenes / "scene_000"
    res = cm.to_colmap(gt_prediction(scene), ExportOptions(max_points=300))
    out = write_workspace(res, tmp_path, ExportOptions(formats=["nerfstudio"]), sources(scene))
    assert out["nerfstudio"] == "transforms.json"
    doc = json.loads((tmp_path / "transforms.json").read_text())
    m = res.model
    assert [f["file_path"] for f in doc["frames"]] == [f"images/{n}" for n in m.image_names]
    assert all((tmp_path / f["file_path"]).exists() for f in doc["frames"])
    assert doc["ply_file_path"] == "sparse/0/points3D.ply" and (tmp_path / doc["ply_file_path"]).is_file()
    for i, frame in enumerate(doc["frames"]):
        c2w = np.asarray(frame["transform_matrix"])
        # nerfstudio's camera looks down -z with y up: back to OpenCV, then world -> camera -> pixels
        w2c = np.linalg.inv(c2w @ np.diag([1.0, -1.0, -1.0, 1.0]))
        seen = m.obs_point[m.obs_image == i]
        cam = (w2c[:3, :3] @ m.xyz[seen].T + w2c[:3, 3:]).T
        u = frame["fl_x"] * cam[:, 0] / cam[:, 2] + frame["cx"]
        v = frame["fl_y"] * cam[:, 1] / cam[:, 2] + frame["cy"]
        uv = np.stack([u, v], 1)
        cam_ref = (m.cam_from_world[i][:, :3] @ m.xyz[seen].T + m.cam_from_world[i][:, 3:]).T
        fx, fy, cx, cy = m.camera_params[m.image_camera[i]]
        uv_ref = np.stack([fx * cam_ref[:, 0] / cam_ref[:, 2] + cx, fy * cam_ref[:, 1] / cam_ref[:, 2] + cy], 1)
        np.testing.assert_allclose(uv, uv_ref, atol=1e-6)
        assert (frame["w"], frame["h"]) == tuple(int(v) for v in m.camera_sizes[m.image_camera[i]])


def test_a_new_format_is_one_registered_function(synth_scenes: Path, tmp_path: Path) -> None:
    def write_names(result: cm.ColmapResult, folder: Path, options: ExportOptions, src: list[Path] | None) -> dict:
        (folder / "names.txt").write_text("\n".join(result.model.image_names))
        return {"names": "names.txt"}

    register_writer("names-test", write_names)
    try:
        res = cm.to_colmap(gt_prediction(synth_scenes / "scene_000"), ExportOptions(max_points=50))
        assert "names" not in write_workspace(res, tmp_path / "a", ExportOptions())  # off unless asked for
        out = write_workspace(res, tmp_path / "b", ExportOptions(formats=["names-test"]))
        assert out["names"] == "names.txt" and (tmp_path / "b" / "names.txt").read_text().count("\n") >= 1
    finally:
        export._WRITERS.pop("names-test")


def test_unknown_formats_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown export format.*mesh.*known: colmap"):
        check_formats(["nerfstudio", "mesh"])

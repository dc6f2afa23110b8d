"""Scene folders -> COLMAP models: readers, filtering, atomic writes, and COLMAP itself reading the result."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from quantvggt.reconstruct import ReconstructionOptions, SceneError, main, reconstruct_scene, to_colmap, write_scene
from tests.conftest import sane_tiny_model


@pytest.fixture(scope="module")
def model():
    return sane_tiny_model()


def _copy_scene(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in sorted(src.glob("*.png")):
        shutil.copy(p, dst / p.name)
    return dst


def test_colmap_model_round_trip(model, synth_scenes: Path, tmp_path: Path) -> None:
    opts = ReconstructionOptions(max_points=2000, conf_percentile=20)
    out = Path(main(model, synth_scenes / "scene_000", tmp_path / "out", opts).output)
    sparse = out / "sparse" / "0"
    assert {"cameras.bin", "images.bin", "points3D.bin", "rigs.bin", "frames.bin"} <= {p.name for p in sparse.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 6 and 0 < report["points"]["kept"] <= 2000
    assert report["points"]["confidence"]["threshold"] > 0
    rec = pycolmap.Reconstruction(str(sparse))
    assert rec.num_reg_images() == 6 and rec.num_points3D() == report["points"]["kept"]
    pred = reconstruct_scene(model, synth_scenes / "scene_000", opts)
    for img in rec.images.values():
        i = pred.names.index(img.name)
        np.testing.assert_allclose(img.cam_from_world().matrix(), pred.extrinsics[i], atol=1e-6)
        cam = rec.cameras[img.camera_id]
        assert cam.model.name == "PINHOLE" and (cam.width, cam.height) == (112, 84)  # original resolution
    assert len(rec.cameras) == 1  # same size and (near) identical predicted intrinsics -> one shared camera
    for p in rec.points3D.values():
        assert p.track.length() == 1
    assert rec.compute_mean_reprojection_error() < 1e-3  # depth points re-project onto their pixels


def test_colmap_itself_reads_the_model(model, synth_scenes: Path, tmp_path: Path) -> None:
    colmap = shutil.which("colmap")
    if colmap is None:
        pytest.skip("COLMAP is not installed (CI installs it with apt-get install colmap)")
    out = Path(main(model, synth_scenes / "scene_001", tmp_path / "out", ReconstructionOptions(max_points=500)).output)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    res = subprocess.run(
        [colmap, "model_analyzer", "--path", str(out / "sparse" / "0")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert int(re.search(r"Registered images:\s*(\d+)", text).group(1)) == 6
    assert int(re.search(r"Points:\s*(\d+)", text).group(1)) == 500


def test_bad_images_skipped_and_reported(model, synth_scenes: Path, tmp_path: Path) -> None:
    scene = _copy_scene(synth_scenes / "scene_000", tmp_path / "messy")
    (scene / "empty.jpg").write_bytes(b"")
    (scene / "corrupt.png").write_bytes((scene / "frame_000.png").read_bytes()[:100])
    (scene / "notes.txt").write_text("not an image")  # not an image extension: ignored entirely
    (scene / "fake.webp").write_text("text pretending")
    out = Path(main(model, scene, tmp_path / "out", ReconstructionOptions(max_points=100)).output)
    report = json.loads((out / "report.json").read_text())
    skipped = {s["name"]: s["reason"] for s in report["images_skipped"]}
    assert set(skipped) == {"empty.jpg", "corrupt.png", "fake.webp"}
    assert "empty" in skipped["empty.jpg"] and "corrupt" in skipped["corrupt.png"]
    assert len(report["images_used"]) == 6


def test_too_few_images_is_a_clear_error(model, tmp_path: Path) -> None:
    scene = tmp_path / "lonely"
    scene.mkdir()
    Image.new("RGB", (40, 30)).save(scene / "only.png")
    (scene / "bad.jpg").write_bytes(b"")
    with pytest.raises(SceneError, match="lonely: needs at least 2 usable images, found 1"):
        main(model, scene, tmp_path / "out")
    assert not (tmp_path / "out" / "lonely").exists()


def test_frame_cap_subsamples_evenly(model, synth_scenes: Path, tmp_path: Path) -> None:
    out = Path(
        main(
            model, synth_scenes / "scene_000", tmp_path / "out", ReconstructionOptions(max_frames=3, max_points=50)
        ).output
    )
    report = json.loads((out / "report.json").read_text())
    assert (
        report["images_used"] == ["frame_000.png", "frame_002.png", "frame_005.png"] or len(report["images_used"]) == 3
    )
    assert len(report["images_dropped_by_frame_cap"]) == 3


def test_mixed_sizes_get_their_own_cameras(model, synth_scenes: Path, tmp_path: Path) -> None:
    scene = _copy_scene(synth_scenes / "scene_000", tmp_path / "mixed")
    Image.open(scene / "frame_001.png").resize((160, 90)).save(scene / "frame_001.png")
    pred = reconstruct_scene(model, scene, ReconstructionOptions())
    rec = to_colmap(pred, ReconstructionOptions(max_points=200)).reconstruction
    sizes = sorted({(c.width, c.height) for c in rec.cameras.values()})
    assert sizes == [(112, 84), (160, 90)]
    assert rec.compute_mean_reprojection_error() < 1e-3


def test_crash_leaves_no_complete_looking_output(
    model, synth_scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pred = reconstruct_scene(model, synth_scenes / "scene_000")
    colmap = to_colmap(pred, ReconstructionOptions(max_points=100))

    class Boom(Exception):  # noqa: N818
        pass

    def exploding_dumps(*a: object, **k: object) -> str:
        raise Boom()  # the sparse model is already on disk when the report fails

    monkeypatch.setattr("quantvggt.reconstruct.json.dumps", exploding_dumps)
    with pytest.raises(Boom):
        write_scene(pred, colmap, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_text_and_point_map_options(model, synth_scenes: Path, tmp_path: Path) -> None:
    opts = ReconstructionOptions(points_from="point_map", conf_threshold=0.0, max_points=64, text=True)
    out = Path(main(model, synth_scenes / "scene_000", tmp_path / "out", opts).output)
    assert (out / "sparse" / "0" / "points3D.txt").is_file()
    assert json.loads((out / "report.json").read_text())["points"]["kept"] == 64


def test_to_colmap_leaves_its_input_unchanged(model, synth_scenes: Path) -> None:
    import copy

    pred = reconstruct_scene(model, synth_scenes / "scene_000", ReconstructionOptions())
    before = copy.deepcopy(pred)
    colmap = to_colmap(pred, ReconstructionOptions(max_points=100))
    for name in ("extrinsics", "intrinsics", "depth", "depth_conf", "world_points", "images"):
        np.testing.assert_array_equal(getattr(pred, name), getattr(before, name), err_msg=name)
    assert pred.report == before.report and "points" not in pred.report
    assert colmap.report["points"]["kept"] == colmap.reconstruction.num_points3D() == 100
    assert colmap.report["cameras"] == 1 and colmap.intrinsics.shape == pred.intrinsics.shape
    # one shared camera: every frame's written intrinsics are the average of the predicted ones
    np.testing.assert_allclose(colmap.intrinsics, np.broadcast_to(colmap.intrinsics[0], colmap.intrinsics.shape))


def test_main_returns_a_scene_result(model, synth_scenes: Path, tmp_path: Path) -> None:
    opts = ReconstructionOptions(max_points=100)
    res = main(model, synth_scenes / "scene_001", tmp_path / "out", opts)
    assert (res.scene, res.status, res.images, res.points) == ("scene_001", "done", 6, 100)
    assert res.output == str(tmp_path / "out" / "scene_001") and res.seconds > 0 and res.error == ""
    report = json.loads(Path(res.report).read_text())
    assert report["images"] == res.images and report["points"]["kept"] == res.points
    again = main(model, synth_scenes / "scene_001", tmp_path / "out", opts, overwrite=False)
    assert (again.status, again.images, again.points) == ("skipped", 6, 100)


def test_scene_given_as_dot_is_named_after_its_folder(
    model, synth_scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(synth_scenes / "scene_000")
    res = main(model, ".", tmp_path / "out", ReconstructionOptions(max_points=50))
    assert res.scene == "scene_000" and (tmp_path / "out" / "scene_000" / "sparse" / "0" / "points3D.bin").is_file()

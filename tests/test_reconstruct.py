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
    # the single-view export (tracks in tests/test_colmap.py): every point observed once, where it was unprojected
    opts = ReconstructionOptions(max_points=2000, conf_percentile=20, tracks=False)
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


def test_frame_cap_chunks_instead_of_dropping(model, synth_scenes: Path, tmp_path: Path) -> None:
    opts = ReconstructionOptions(max_frames=3, max_points=50, max_align_residual=10.0)
    out = Path(main(model, synth_scenes / "scene_000", tmp_path / "out", opts).output)
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 6 and sorted(report["images_used"]) == [f"frame_{i:03d}.png" for i in range(6)]
    assert "images_dropped_by_frame_cap" not in report and report["images_unregistered"] == []
    chunking = report["chunking"]
    assert chunking["design"] == "sequential" and chunking["chunks"] >= 3
    assert all(c["status"] in ("reference", "aligned") for c in chunking["per_chunk"])
    assert pycolmap.Reconstruction(str(out / "sparse" / "0")).num_reg_images() == 6


def test_mixed_sizes_get_their_own_cameras(model, synth_scenes: Path, tmp_path: Path) -> None:
    scene = _copy_scene(synth_scenes / "scene_000", tmp_path / "mixed")
    Image.open(scene / "frame_001.png").resize((160, 90)).save(scene / "frame_001.png")
    pred = reconstruct_scene(model, scene, ReconstructionOptions())
    rec = to_colmap(pred, ReconstructionOptions(max_points=200, tracks=False)).reconstruction  # single-view points
    sizes = sorted({(c.width, c.height) for c in rec.cameras.values()})
    assert sizes == [(112, 84), (160, 90)]
    assert rec.compute_mean_reprojection_error() < 1e-3


def test_crash_leaves_no_complete_looking_output(
    model, synth_scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pred = reconstruct_scene(model, synth_scenes / "scene_000")
    colmap = to_colmap(pred, ReconstructionOptions(max_points=100))

    class Boom(Exception):  # noqa: N818  (a test's throwaway exception)
        pass

    def exploding_dumps(*a: object, **k: object) -> str:
        raise Boom()  # the sparse model is already on disk when the report fails

    monkeypatch.setattr("quantvggt.reconstruct.json.dumps", exploding_dumps)
    with pytest.raises(Boom):
        write_scene(pred, colmap, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_text_and_point_map_options(model, synth_scenes: Path, tmp_path: Path) -> None:
    # single-view points: the random model's point maps agree across frames too rarely to make tracks
    opts = ReconstructionOptions(points_from="point_map", conf_threshold=0.0, max_points=64, text=True, tracks=False)
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


def test_chunked_with_anchors_registers_every_image(model, synth_scenes: Path, tmp_path: Path) -> None:
    opts = ReconstructionOptions(max_frames=4, chunking="anchors", anchors=2, max_points=50, max_align_residual=10.0)
    pred = reconstruct_scene(model, synth_scenes / "scene_001", opts)
    assert sorted(pred.names) == [f"frame_{i:03d}.png" for i in range(6)]
    chunking = pred.report["chunking"]
    assert chunking["design"] == "anchors" and len(chunking["anchors"]) == 2 and chunking["chunks"] == 2
    second = chunking["per_chunk"][1]
    assert second["shared"] == chunking["anchors"] and second["residual"] is not None
    assert {"load", "model"} <= set(second["timings_s"]) and {"align", "merge"} <= set(pred.report["timings_s"])
    assert pred.report["model_input_hw"] == list(pred.depth.shape[1:])
    assert pred.depth.shape[0] == 6 and np.isfinite(pred.extrinsics).all()


def test_a_chunk_that_fails_to_align_is_reported(model, synth_scenes: Path, tmp_path: Path) -> None:
    scene = _copy_scene(synth_scenes / "scene_000", tmp_path / "hard")
    (scene / "frame_zzz.png").write_bytes(b"not a png")  # unreadable frames are still skipped, one by one
    opts = ReconstructionOptions(max_frames=4, overlap=2, max_points=50, max_align_residual=1e-9)
    out = Path(main(model, scene, tmp_path / "out", opts).output)
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["images_skipped"]] == ["frame_zzz.png"]
    assert report["images"] == 4 and len(report["images_unregistered"]) == 2  # chunk 0 only: frames 0-3
    for lost in report["images_unregistered"]:
        assert "chunk 1" in lost["reason"] and "residual" in lost["reason"]
    failed = report["chunking"]["per_chunk"][1]
    assert failed["status"] == "failed" and failed["residual"] > 1e-9
    assert pycolmap.Reconstruction(str(out / "sparse" / "0")).num_reg_images() == 4


def test_memory_budget_lowers_the_single_pass_limit(model, synth_scenes: Path) -> None:
    from quantvggt.chunking import forward_bytes, frames_for_budget

    budget = forward_bytes(model, 3, 84, 112) / 2**20
    assert frames_for_budget(model, 84, 112, budget * 2**20) == 3
    opts = ReconstructionOptions(image_size=112, memory_budget_mb=budget, max_align_residual=10.0)  # 112x84 input
    pred = reconstruct_scene(model, synth_scenes / "scene_000", opts)
    assert pred.report["memory"]["frames_in_budget"] == 3 and pred.report["chunking"]["frames_per_chunk"] == [3] * 3
    assert len(pred.names) == 6

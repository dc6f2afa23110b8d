"""COLMAP export: multi-view tracks, the vectorised binary writer, bundle adjustment, and the workspace COLMAP opens."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from quantvggt import colmap as cm
from quantvggt.export import write_workspace
from quantvggt.images import ImageTransform
from quantvggt.prediction import ScenePrediction
from quantvggt.synth import load_gt


def gt_prediction(scene: Path, **changes: object) -> ScenePrediction:
    """A 'prediction' that is the synthetic scene's ground truth (model pixels = original pixels)."""
    gt = load_gt(scene)
    S = len(gt["names"])
    paths = [scene / n for n in gt["names"]]
    images = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in paths])
    pred = ScenePrediction(
        scene=scene.name,
        names=gt["names"],
        original_sizes=[(gt["width"], gt["height"])] * S,
        transforms=[ImageTransform(1.0, 1.0, 0.0, 0.0)] * S,
        extrinsics=gt["extrinsics"],
        intrinsics=gt["intrinsics"],
        depth=gt["depth"],
        depth_conf=np.full(gt["depth"].shape, 2.0, np.float32),
        world_points=None,
        world_points_conf=None,
        images=images,
    )
    return replace(pred, **changes)


def sources(scene: Path) -> list[Path]:
    """The image files of a synthetic scene, in the order of its ground truth."""
    return [scene / n for n in load_gt(scene)["names"]]


def random_model(seed: int = 0, S: int = 3, N: int = 50) -> cm.ColmapModel:
    """A small model with random points, tracks of 1..S observations and two cameras of different sizes."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, S + 1, N)
    obs_point = np.repeat(np.arange(N), lengths)
    obs_image = np.concatenate([np.sort(rng.choice(S, L, replace=False)) for L in lengths])
    extr = np.stack([np.hstack([np.eye(3), [[i * 0.1], [0.0], [2.0]]]) for i in range(S)])
    return cm.ColmapModel(
        camera_sizes=np.array([[64, 48], [80, 60]]),
        camera_params=np.array([[60.0, 61.0, 32.0, 24.0], [70.0, 70.0, 40.0, 30.0]]),
        image_names=[f"im_{i}.png" for i in range(S)],
        image_camera=np.array([0] * (S - 1) + [1]),
        cam_from_world=extr,
        xyz=rng.normal(size=(N, 3)),
        rgb=rng.integers(0, 256, (N, 3)).astype(np.uint8),
        obs_point=obs_point,
        obs_image=obs_image,
        obs_xy=rng.uniform(0, 48, (obs_point.size, 2)),
    )


def test_binary_writer_round_trips_through_pycolmap(tmp_path: Path) -> None:
    m = random_model()
    m.write(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "cameras.bin",
        "images.bin",
        "points3D.bin",
        "rigs.bin",
        "frames.bin",
    }
    rec = pycolmap.Reconstruction(str(tmp_path))
    assert (rec.num_cameras(), rec.num_reg_images(), rec.num_points3D()) == (2, 3, 50)
    assert rec.compute_num_observations() == m.obs_point.size
    for c in range(2):
        cam = rec.camera(c + 1)
        assert cam.model.name == "PINHOLE" and (cam.width, cam.height) == tuple(m.camera_sizes[c])
        np.testing.assert_allclose(cam.params, m.camera_params[c])
    for i, name in enumerate(m.image_names):
        img = rec.image(i + 1)
        assert img.name == name and img.camera_id == m.image_camera[i] + 1
        np.testing.assert_allclose(img.cam_from_world().matrix(), m.cam_from_world[i], atol=1e-12)
    errors = m.point_errors()
    for pid in range(1, 51):
        p = rec.point3D(pid)
        np.testing.assert_allclose(p.xyz, m.xyz[pid - 1])
        np.testing.assert_array_equal(p.color, m.rgb[pid - 1])
        assert p.error == pytest.approx(errors[pid - 1])
        mine = np.flatnonzero(m.obs_point == pid - 1)
        assert sorted(e.image_id for e in p.track.elements) == sorted(m.obs_image[mine] + 1)
        for e in p.track.elements:  # every track element points at a keypoint that points back at the point
            kp = rec.image(e.image_id).points2D[e.point2D_idx]
            assert kp.point3D_id == pid
            k = mine[m.obs_image[mine] == e.image_id - 1][0]
            np.testing.assert_allclose(kp.xy, m.obs_xy[k])


def test_ply_has_what_viewers_and_gaussian_splatting_read(tmp_path: Path) -> None:
    m = random_model()
    m.write_ply(tmp_path / "points3D.ply")
    data = (tmp_path / "points3D.ply").read_bytes()
    header, body = data.split(b"end_header\n", 1)
    assert b"element vertex 50" in header and b"format binary_little_endian 1.0" in header
    names = re.findall(rb"property (\w+) (\w+)", header)
    assert [n for _, n in names] == [b"x", b"y", b"z", b"nx", b"ny", b"nz", b"red", b"green", b"blue"]
    dt = np.dtype(
        [(k, "<f4") for k in ("x", "y", "z", "nx", "ny", "nz")] + [(k, "u1") for k in ("red", "green", "blue")]
    )
    v = np.frombuffer(body, dt)
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), m.xyz, rtol=1e-6)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), m.rgb)


def test_tracks_on_exact_geometry_are_long_unique_and_reproject(synth_scenes: Path) -> None:
    pred = gt_prediction(synth_scenes / "scene_000")
    res = cm.to_colmap(pred, cm.ExportOptions(max_points=3000, track_tolerance=0.02))
    m, tracks = res.model, res.report["tracks"]
    lengths = m.track_lengths()
    assert m.num_points == res.report["points"]["kept"] == 3000
    assert lengths.min() >= 2 and tracks["mean_length"] == pytest.approx(lengths.mean(), abs=1e-4)
    assert tracks["mean_length"] >= 3  # 6 views of one small scene: most points are seen by half the frames or more
    assert sum(tracks["length_histogram"].values()) == 3000
    # each pixel observation belongs to at most one track; a track observes each image at most once
    assert len(set(zip(m.obs_image.tolist(), map(tuple, m.obs_xy.round(6).tolist())))) == m.obs_point.size
    assert len(set(zip(m.obs_point.tolist(), m.obs_image.tolist()))) == m.obs_point.size
    # with exact cameras and depth a point (its observers' depths fused) projects within about a pixel of each
    # observation, the centre of the pixel it fell into; more only at depth edges
    res_px = m.residuals()
    assert np.median(res_px) < 0.5 and np.percentile(res_px, 99) < 1.0 and res_px.max() < 2.0


def test_track_options(synth_scenes: Path) -> None:
    pred = gt_prediction(synth_scenes / "scene_001")
    single = cm.to_colmap(pred, cm.ExportOptions(max_points=500, tracks=False))
    assert (single.model.track_lengths() == 1).all() and single.report["tracks"]["enabled"] is False
    assert single.model.num_points == 500 and single.report["reprojection_error"]["median"] < 1e-6
    loose = cm.to_colmap(pred, cm.ExportOptions(max_points=500, min_track_length=1, track_tolerance=1e-6))
    assert loose.model.num_points == 500 and loose.model.track_lengths().min() == 1  # nothing agrees that closely
    strict = cm.to_colmap(pred, cm.ExportOptions(max_points=500, min_track_length=4))
    assert strict.model.track_lengths().min() >= 4
    with pytest.raises(ValueError, match="min_track_length must be >= 1"):
        cm.ExportOptions(min_track_length=0)
    with pytest.raises(ValueError, match="images must be one of link, copy, none"):
        cm.ExportOptions(images="hardlink")


def test_to_colmap_leaves_the_prediction_unchanged(synth_scenes: Path) -> None:
    import copy

    pred = gt_prediction(synth_scenes / "scene_000")
    before = copy.deepcopy(pred)
    cm.to_colmap(pred, cm.ExportOptions(max_points=300, ba=True))
    for name in ("extrinsics", "intrinsics", "depth", "depth_conf", "images"):
        np.testing.assert_array_equal(getattr(pred, name), getattr(before, name), err_msg=name)


def _perturbed(scene: Path, seed: int = 0) -> ScenePrediction:
    """Ground truth with small pose noise and a 3 % focal error: a prediction that BA can make consistent."""
    pred = gt_prediction(scene)
    rng = np.random.default_rng(seed)
    extr = pred.extrinsics.copy()
    extr[1:, :, 3] += rng.normal(scale=0.01, size=(len(extr) - 1, 3))
    K = pred.intrinsics.copy()
    K[:, 0, 0] *= 1.03
    K[:, 1, 1] *= 1.03
    return replace(pred, extrinsics=extr, intrinsics=K)


def test_bundle_adjustment_lowers_the_error_and_reports_it(synth_scenes: Path) -> None:
    pred = _perturbed(synth_scenes / "scene_000")
    res = cm.to_colmap(pred, cm.ExportOptions(max_points=1500, ba=True))
    ba = res.report["ba"]
    assert ba["accepted"] and ba["termination"] in ("CONVERGENCE", "NO_CONVERGENCE")
    assert ba["cost_after"] <= ba["cost_before"]
    assert ba["after"]["median"] < ba["before"]["median"] and ba["after"]["median"] < 1.0
    assert [r["image"] for r in ba["per_image"]] == pred.names
    assert sum(r["observations"] for r in ba["per_image"]) == res.model.obs_point.size
    np.testing.assert_allclose(res.model.cam_from_world[0], pred.extrinsics[0], atol=1e-9)  # gauge: first pose fixed
    # the result is the adjusted model: its own residuals are the reported ones
    assert np.median(res.model.residuals()) == pytest.approx(ba["after"]["median"], abs=1e-5)
    # intrinsics in the result follow the refined focal length
    f_model = res.intrinsics[0, 0, 0]
    assert f_model == pytest.approx(res.model.camera_params[0, 0], rel=1e-9)
    assert res.reconstruction.compute_mean_reprojection_error() < 1.0


def test_bundle_adjustment_never_returns_a_worse_model(synth_scenes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pred = _perturbed(synth_scenes / "scene_001")
    ff = cm.to_colmap(pred, cm.ExportOptions(max_points=400))
    costs = iter([1.0, 2.0])  # pretend the adjusted model is worse on the robust cost
    monkeypatch.setattr(cm, "_cauchy_cost", lambda res, scale=1.0: next(costs))
    res = cm.to_colmap(pred, cm.ExportOptions(max_points=400, ba=True))
    assert res.report["ba"]["accepted"] is False and "cost went up" in res.report["ba"]["reason"]
    np.testing.assert_array_equal(res.model.xyz, ff.model.xyz)
    np.testing.assert_array_equal(res.model.cam_from_world, ff.model.cam_from_world)
    np.testing.assert_array_equal(res.intrinsics, ff.intrinsics)


def test_bundle_adjustment_without_tracks_is_skipped_and_said(synth_scenes: Path) -> None:
    res = cm.to_colmap(
        gt_prediction(synth_scenes / "scene_001"), cm.ExportOptions(max_points=100, tracks=False, ba=True)
    )
    assert res.report["ba"]["accepted"] is False and "track of 2" in res.report["ba"]["reason"]


@pytest.mark.parametrize("mode", ["link", "copy", "none"])
def test_workspace_images(synth_scenes: Path, tmp_path: Path, mode: str) -> None:
    pred = gt_prediction(synth_scenes / "scene_000")
    res = cm.to_colmap(pred, cm.ExportOptions(max_points=200))
    src = sources(synth_scenes / "scene_000")
    out = write_workspace(res, tmp_path / "ws", cm.ExportOptions(images=mode), src)
    assert out["images"] == mode and out["ply"] == "sparse/0/points3D.ply"
    assert (tmp_path / "ws" / "sparse" / "0" / "points3D.ply").is_file()
    assert (tmp_path / "ws" / "database.db").is_file()
    images = tmp_path / "ws" / "images"
    if mode == "none":
        assert not images.exists()
        return
    assert sorted(p.name for p in images.iterdir()) == sorted(pred.names)
    for name, path in zip(pred.names, src):
        p = images / name
        assert p.is_symlink() == (mode == "link") and p.read_bytes() == path.read_bytes()
        if mode == "link":
            assert Path(os.readlink(p)).is_absolute()
    # the workspace can move (it is built in a temporary folder and renamed): absolute links stay valid
    moved = tmp_path / "moved"
    (tmp_path / "ws").rename(moved)
    assert all((moved / "images" / n).read_bytes() for n in pred.names)


def test_workspace_without_known_sources_has_no_images(synth_scenes: Path, tmp_path: Path) -> None:
    res = cm.to_colmap(gt_prediction(synth_scenes / "scene_000"), cm.ExportOptions(max_points=50))
    out = write_workspace(res, tmp_path / "ws", cm.ExportOptions(images="copy"), None)
    assert out["images"].startswith("none") and not (tmp_path / "ws" / "images").exists()


def test_database_holds_the_tracks(synth_scenes: Path, tmp_path: Path) -> None:
    res = cm.to_colmap(gt_prediction(synth_scenes / "scene_000"), cm.ExportOptions(max_points=300))
    m = res.model
    db = m.write_database(tmp_path / "database.db")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == len(m.image_names)
        assert con.execute("SELECT sum(rows) FROM keypoints").fetchone()[0] == m.obs_point.size
        n_pairs = con.execute("SELECT sum(rows) FROM two_view_geometries").fetchone()[0]
    lengths = m.track_lengths()
    assert n_pairs == int((lengths * (lengths - 1) // 2).sum())  # every two observations of a track are a match
    assert pycolmap.Database.open(str(db)).num_keypoints() == m.obs_point.size  # newer COLMAP upgrades and reads it


def _colmap(*args: str) -> str:
    exe = shutil.which("colmap")
    assert exe is not None
    res = subprocess.run(
        [exe, *args], capture_output=True, text=True, env=dict(os.environ, QT_QPA_PLATFORM="offscreen"), timeout=300
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0, f"colmap {args[0]} failed:\n{text[-3000:]}"
    return text


def test_colmap_tools_refine_the_exported_workspace(synth_scenes: Path, tmp_path: Path) -> None:
    if shutil.which("colmap") is None:
        pytest.skip("COLMAP is not installed (CI installs it with apt-get install colmap)")
    pred = _perturbed(synth_scenes / "scene_001")
    res = cm.to_colmap(pred, cm.ExportOptions(max_points=800))
    ws = tmp_path / "ws"
    write_workspace(res, ws, cm.ExportOptions(images="link"), sources(synth_scenes / "scene_001"))
    text = _colmap("model_analyzer", "--path", str(ws / "sparse" / "0"))
    assert int(re.search(r"Points:\s*(\d+)", text).group(1)) == 800
    assert float(re.search(r"Mean track length:\s*([\d.]+)", text).group(1)) >= 2
    (tmp_path / "ba").mkdir()
    text = _colmap("bundle_adjuster", "--input_path", str(ws / "sparse" / "0"), "--output_path", str(tmp_path / "ba"))
    assert "Termination" in text
    assert pycolmap.Reconstruction(str(tmp_path / "ba")).num_points3D() == 800
    (tmp_path / "tri").mkdir()
    _colmap(
        "point_triangulator",
        "--database_path",
        str(ws / "database.db"),
        "--image_path",
        str(ws / "images"),
        "--input_path",
        str(ws / "sparse" / "0"),
        "--output_path",
        str(tmp_path / "tri"),
    )
    tri = pycolmap.Reconstruction(str(tmp_path / "tri"))
    assert tri.num_reg_images() == len(pred.names) and tri.num_points3D() > 400
    assert tri.compute_mean_track_length() >= 2
    # MVS starts from the undistorted workspace
    _colmap(
        "image_undistorter",
        "--image_path",
        str(ws / "images"),
        "--input_path",
        str(ws / "sparse" / "0"),
        "--output_path",
        str(tmp_path / "dense"),
    )
    assert len(list((tmp_path / "dense" / "images").iterdir())) == len(pred.names)


# -- through reconstruct.main, the CLI and the batch pipeline (the small random model of the other tests) ----------
@pytest.fixture(scope="module")
def model():
    from tests.conftest import sane_tiny_model

    return sane_tiny_model()


def test_main_writes_a_ready_workspace(model, synth_scenes: Path, tmp_path: Path) -> None:
    import json

    from quantvggt.reconstruct import ReconstructionOptions, main

    res = main(model, synth_scenes / "scene_000", tmp_path / "out", ReconstructionOptions(max_points=300))
    ws = Path(res.output)
    report = json.loads((ws / "report.json").read_text())
    assert report["workspace"]["images"] == "link" and report["tracks"]["enabled"]
    assert report["points"]["kept"] == res.points == pycolmap.Reconstruction(str(ws / "sparse" / "0")).num_points3D()
    assert {"mean_length", "median_length", "length_histogram"} <= set(report["tracks"])
    assert (ws / "sparse" / "0" / "points3D.ply").is_file() and (ws / "database.db").is_file()
    for name in report["images_used"]:  # absolute links into the scene folder, valid after the temp folder's rename
        link = ws / "images" / name
        assert link.is_symlink() and Path(os.readlink(link)).is_absolute()
        assert link.resolve() == (synth_scenes / "scene_000" / name).resolve()


def test_tracks_map_through_resized_frames(synth_scenes: Path) -> None:
    # frame 1 as if its original were twice the model's resolution: keypoints and its camera are in its own pixels
    pred = gt_prediction(synth_scenes / "scene_000")
    sizes, transforms = list(pred.original_sizes), list(pred.transforms)
    sizes[1], transforms[1] = (224, 168), ImageTransform(0.5, 0.5, 0.0, 0.0)
    pred = replace(pred, original_sizes=sizes, transforms=transforms)
    res = cm.to_colmap(pred, cm.ExportOptions(max_points=2000, track_tolerance=0.02))
    m = res.model
    assert sorted(map(tuple, m.camera_sizes.tolist())) == [(112, 84), (224, 168)]
    np.testing.assert_allclose(m.camera_params[m.image_camera[1]], 2 * m.camera_params[m.image_camera[0]])
    scale = np.where(m.obs_image == 1, 2.0, 1.0)  # original pixels per model pixel
    model_px = m.residuals() / scale
    assert (m.obs_image == 1).sum() > 500 and np.median(model_px) < 0.5 and model_px.max() < 2.0
    assert np.median(model_px[m.obs_image == 1]) < 0.5  # a wrong mapping would be tens of pixels off
    assert (m.obs_xy[m.obs_image == 1] > [112, 84]).any(axis=1).any()  # keypoints span the larger image


def test_reconstruct_command_export_options(synth_scenes: Path, tmp_path: Path) -> None:
    import json

    from quantvggt.cli import main as cli

    args = [str(synth_scenes / "scene_001"), "--model", "vggt-tiny-synthetic", "--max-points", "2000"]
    rc = cli(
        ["reconstruct", *args, "--out", str(tmp_path / "a"), "--ba", "--images", "copy", "--min-track-length", "3"]
    )
    assert rc == 0
    ws = tmp_path / "a" / "scene_001"
    report = json.loads((ws / "report.json").read_text())
    assert report["options"]["ba"] and report["options"]["min_track_length"] == 3
    assert min(int(k) for k in report["tracks"]["length_histogram"]) >= 3
    ba = report["ba"]
    assert ba["accepted"] and ba["after"]["median"] <= ba["before"]["median"] and len(ba["per_image"]) == 6
    assert report["workspace"]["images"] == "copy" and not any(p.is_symlink() for p in (ws / "images").iterdir())
    rec = pycolmap.Reconstruction(str(ws / "sparse" / "0"))
    assert rec.num_points3D() == report["points"]["kept"] and rec.compute_mean_track_length() >= 3
    rc = cli(["reconstruct", *args, "--out", str(tmp_path / "b"), "--no-tracks", "--images", "none", "--no-ply"])
    assert rc == 0
    ws = tmp_path / "b" / "scene_001"
    report = json.loads((ws / "report.json").read_text())
    assert report["tracks"]["enabled"] is False and report["tracks"]["max_length"] == 1
    assert not (ws / "images").exists() and not (ws / "sparse" / "0" / "points3D.ply").exists()


def test_pipeline_copies_the_images_of_fetched_scenes(model, synth_scenes: Path, tmp_path: Path) -> None:
    import json
    import uuid

    from quantvggt.reconstruct import ReconstructionOptions, SceneJob, process_scene
    from quantvggt.storage import open_storage

    inbox = open_storage(f"memory://{uuid.uuid4().hex}/inbox")  # a remote scene: its download is temporary
    for p in (p for p in (synth_scenes / "scene_001").iterdir() if p.is_file()):
        inbox.upload(p, f"scene_001/{p.name}")
    job = SceneJob(inbox.uri("scene_001"), str(tmp_path / "out"), options=ReconstructionOptions(max_points=100))
    res = process_scene(model, job)
    assert res.status == "done", res.error
    ws = tmp_path / "out" / "scene_001"
    assert json.loads((ws / "report.json").read_text())["workspace"]["images"] == "copy"
    images = sorted((ws / "images").iterdir())
    assert len(images) == 6 and not any(p.is_symlink() for p in images)


def _camera_pred(focals: list[float], sizes: list[tuple[int, int]]) -> object:
    from types import SimpleNamespace

    K = [np.array([[f, 0, s[0] / 2], [0, f, s[1] / 2], [0, 0, 1]]) for f, s in zip(focals, sizes)]
    ident = ImageTransform(1.0, 1.0, 0.0, 0.0)
    return SimpleNamespace(
        names=[f"{i}.png" for i in range(len(focals))],
        intrinsics=np.stack(K),
        transforms=[ident] * len(focals),
        original_sizes=sizes,
    )


def test_one_physical_camera_is_one_colmap_camera_despite_per_frame_focal_scatter() -> None:
    # VGGT's per-frame focal predictions for one camera scatter by a few percent (the reported case: 2 cameras)
    pred = _camera_pred([200, 204, 197, 206, 201, 199], [(224, 168)] * 6)
    assert cm.colmap_cameras(pred, 0.08) == [0] * 6
    # the clustering does not depend on the order the frames come in
    pred = _camera_pred([206, 197, 200, 204], [(224, 168)] * 4)
    assert cm.colmap_cameras(pred, 0.08) == [0] * 4


def test_a_zoom_step_or_another_size_is_another_camera() -> None:
    pred = _camera_pred([200, 203, 300, 305, 201], [(224, 168)] * 5)
    assert cm.colmap_cameras(pred, 0.08) == [0, 0, 1, 1, 0]
    # "single": one camera per image size, whatever the focal lengths say
    assert cm.colmap_cameras(pred, 0.08, "single") == [0] * 5
    pred = _camera_pred([200, 200, 200], [(224, 168), (168, 224), (224, 168)])
    assert cm.colmap_cameras(pred, 0.08, "single") == [0, 1, 0]
    assert cm.colmap_cameras(pred, 0.08, "per-image") == [0, 1, 2]


def test_camera_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="camera must be one of auto, single, per-image"):
        cm.ExportOptions(camera="rig")

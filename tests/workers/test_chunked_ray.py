"""A large scene as Ray map/reduce: chunks predicted on any free actor, merged once, every image registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from quantvggt import synth
from quantvggt.reconstruct import ReconstructionOptions
from tests.flows.test_orchestration import bucket, ray_local  # noqa: F401  (fixtures: S3 bucket, local Ray)

pytestmark = pytest.mark.usefixtures("ray_local")
MODEL = "vggt-tiny-synthetic"  # the shipped small model: aligns chunks of its training trajectory (arc) well
# 12 frames over a 6-frame single pass: chunks [0-5], [4-9], [6-11] (sequential, 2 shared frames)
OPTIONS = ReconstructionOptions(max_frames=6, overlap=2, max_points=300, images="none", database=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame scene (chunked) and a 4-frame one (whole)."""
    root = tmp_path_factory.mktemp("chunked")
    synth.make_scene(root / "big", 5, 12, 112, 84, "arc")
    synth.make_scene(root / "small", 6, 4, 112, 84, "arc")
    return root


def _report(out: Path, name: str) -> dict:
    return json.loads((out / name / "report.json").read_text())


def test_large_scene_is_mapped_over_workers_and_fully_registered(scenes: Path, tmp_path: Path) -> None:
    from workers.reconstruct import run_scenes

    plans = []
    big, small = str(scenes / "big"), str(scenes / "small")
    results = run_scenes([big, small], MODEL, str(tmp_path), OPTIONS, num_workers=2, on_plan=plans.append)
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    assert [r.images for r in results] == [12, 4]
    assert [p.job.name for p in plans] == ["big"]  # the small scene ran whole, without a plan
    rec = pycolmap.Reconstruction(str(tmp_path / "big" / "sparse" / "0"))
    assert rec.num_reg_images() == 12  # every image with a pose in images.bin
    report = _report(tmp_path, "big")
    chunking = report["chunking"]
    assert chunking["chunks"] == 3
    assert [c["status"] for c in chunking["per_chunk"]] == ["reference", "aligned", "aligned"]
    assert all(c["worker"] and "model" in c["timings_s"] for c in chunking["per_chunk"])
    assert all(c["residual"] is not None for c in chunking["per_chunk"][1:])
    assert report["images_unregistered"] == [] and len(report["images_used"]) == 12
    assert {"scan", "plan", "model", "align", "merge", "reduce", "total"} <= set(report["timings_s"])
    assert _report(tmp_path, "small")["chunking"] is None

    # the same chunks, aligned and merged by the same ChunkMerger: the same model as reconstructing in one process
    from quantvggt.quant.load import load_model
    from quantvggt.reconstruct import main

    done = main(load_model(MODEL, "cpu"), big, tmp_path / "here", OPTIONS)
    here = pycolmap.Reconstruction(str(Path(done.output) / "sparse" / "0"))
    for image in here.images.values():
        there = rec.find_image_with_name(image.name)
        assert there is not None
        np.testing.assert_allclose(there.cam_from_world().matrix(), image.cam_from_world().matrix(), atol=1e-4)
    assert rec.num_points3D() == here.num_points3D()


def test_failed_chunk_is_reported_not_dropped(scenes: Path, tmp_path: Path) -> None:
    import shutil

    from workers.reconstruct import run_scenes

    scene = tmp_path / "in" / "big"
    shutil.copytree(scenes / "big", scene)

    def vanish(plan) -> None:  # an image readable when planned is gone when its chunk is predicted
        (scene / "frame_011.png").unlink()

    out = tmp_path / "out"
    [result] = run_scenes([str(scene)], MODEL, str(out), OPTIONS, num_workers=2, on_plan=vanish)
    assert result.status == "done" and result.images == 10, result.error  # frames 10, 11 are only in chunk 2
    report = _report(out, "big")
    last = report["chunking"]["per_chunk"][2]
    assert last["status"] == "failed" and "prediction failed" in last["error"] and "frame_011" in last["error"]
    assert [u["name"] for u in report["images_unregistered"]] == ["frame_010.png", "frame_011.png"]
    assert all("chunk 2: prediction failed" in u["reason"] for u in report["images_unregistered"])
    assert pycolmap.Reconstruction(str(out / "big" / "sparse" / "0")).num_reg_images() == 10


def test_chunks_of_an_s3_scene_read_only_their_own_images(request: pytest.FixtureRequest) -> None:
    from quantvggt.storage import open_storage
    from workers.reconstruct import run_scenes

    # scene_000 has 4 frames: over a 3-frame single pass, chunks [0-2] and [1-3], each downloaded on its own
    root = request.getfixturevalue("bucket")  # the moto-server bucket of tests/flows/test_orchestration.py
    opts = ReconstructionOptions(max_frames=3, overlap=2, max_points=100, max_align_residual=10.0)
    out = f"{root}/chunked-out"
    [result] = run_scenes([f"{root}/inbox/scene_000"], f"{root}/models/tiny-w4a4", out, opts, num_workers=2)
    assert result.status == "done" and result.images == 4, result.error
    report = json.loads(open_storage(out).read_bytes("scene_000/report.json"))
    assert report["chunking"]["chunks"] == 2 and report["images_unregistered"] == []
    assert all(c["timings_s"]["fetch"] > 0 for c in report["chunking"]["per_chunk"])
    assert open_storage(out).is_complete("scene_000", source=f"{root}/inbox/scene_000")

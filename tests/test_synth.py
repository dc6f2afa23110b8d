"""Synthetic long captures: orbit, walk and random (unordered) trajectories with exact ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantvggt import synth
from quantvggt.commands import synth as synth_command


def _centres(extr: np.ndarray) -> np.ndarray:
    return -np.einsum("nji,nj->ni", extr[:, :, :3], extr[:, :, 3])


def test_orbit_goes_once_around_and_random_is_the_same_cameras_shuffled(tmp_path: Path) -> None:
    orbit = synth.load_gt(synth.make_scene(tmp_path / "orbit", 5, 36, 32, 24, "orbit"))
    rand = synth.load_gt(synth.make_scene(tmp_path / "random", 5, 36, 32, 24, "random"))
    c = _centres(orbit["extrinsics"])
    angles = np.unwrap(np.arctan2(c[:, 0], c[:, 2]))
    assert 2 * np.pi * 34 / 36 < abs(angles[-1] - angles[0]) < 2 * np.pi  # one full turn, in capture order
    step = np.linalg.norm(np.diff(c, axis=0), axis=1)
    r = _centres(rand["extrinsics"])
    assert np.linalg.norm(np.diff(r, axis=0), axis=1).mean() > 4 * step.mean()  # name order is not capture order
    key = lambda a: a[np.lexsort(a.T)]
    np.testing.assert_allclose(key(r), key(c), atol=1e-12)  # ... but the cameras are the orbit's
    assert rand["names"] == sorted(rand["names"]) and len(set(rand["names"])) == 36
    assert json.loads((tmp_path / "random" / "gt" / "cameras.json").read_text())["trajectory"] == "random"


def test_walk_stays_in_the_room_above_the_boxes(tmp_path: Path) -> None:
    gt = synth.load_gt(synth.make_scene(tmp_path / "walk", 6, 48, 32, 24, "walk"))
    c = _centres(gt["extrinsics"])
    assert (c[:, 1] > 1.1).all() and (np.abs(c[:, 0]) < 3).all() and (c[:, 2] > -3).all() and (c[:, 2] < 3.5).all()
    radius = np.hypot(c[:, 0], c[:, 2])
    assert radius.max() - radius.min() > 0.5  # wanders in and out, unlike the orbit
    assert (gt["depth"] > 0).mean() > 0.95  # every frame looks at the scene (the walls, floor and boxes)


def test_the_default_arc_is_unchanged(tmp_path: Path) -> None:
    # the arc draws from the seed's generator exactly as before the trajectories existed
    rng = np.random.default_rng(11)
    world = synth.make_world(rng)
    extr, K = synth.scene_cameras(rng, 4, 112, 84)
    gt = synth.load_gt(synth.make_scene(tmp_path / "arc", 11, 4, 112, 84))
    np.testing.assert_array_equal(gt["extrinsics"], extr)
    np.testing.assert_array_equal(gt["intrinsics"], K)
    assert "trajectory" not in json.loads((tmp_path / "arc" / "gt" / "cameras.json").read_text())
    rgb, _ = synth.render(world, extr[0], K[0], 112, 84)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "arc" / "frame_000.png")), rgb)


def test_long_captures_name_frames_in_order(tmp_path: Path) -> None:
    gt = synth.load_gt(synth.make_scene(tmp_path / "long", 1, 1001, 8, 6, "orbit"))
    assert gt["names"][0] == "frame_0000.png" and gt["names"][-1] == "frame_1000.png"
    assert sorted(p.name for p in (tmp_path / "long").glob("*.png")) == gt["names"]


def test_synth_command_takes_a_trajectory(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synth_command.configure(parser)
    args = parser.parse_args([str(tmp_path), "--scenes", "1", "--frames", "6", "--size", "32x24", "--trajectory=walk"])
    assert synth_command.run(args) == 0
    assert json.loads((tmp_path / "scene_000" / "gt" / "cameras.json").read_text())["trajectory"] == "walk"
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--trajectory", "spiral"])
    with pytest.raises(ValueError, match="trajectory must be one of"):
        synth.make_scene(tmp_path / "x", 0, 3, 8, 6, "spiral")

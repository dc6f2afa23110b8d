"""Synthetic scenes with exact ground truth: textured planes and boxes ray-cast in numpy from known cameras.

Each scene folder holds ``frame_XXX.png`` images plus ``gt/`` with ``cameras.json`` (OpenCV camera-from-world
extrinsics and intrinsics), ``depth/frame_XXX.npy`` (z-depth, float32) and a COLMAP model in ``gt/sparse/0``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from quantvggt.fsutil import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class Box:
    """Axis-aligned box with a procedural texture."""

    lo: np.ndarray
    hi: np.ndarray
    seed: int


@dataclass
class World:
    """A floor (y = 0, y up), a back wall, a side wall and a few boxes."""

    boxes: list[Box]
    floor_seed: int
    wall_seed: int


def _texture(p: np.ndarray, seed: int) -> np.ndarray:
    """Colour ``[N, 3]`` in [0, 1] at surface points ``p [N, 3]``: checker + stripes + blobs, distinct per seed."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.15, 0.85, 3)
    alt = rng.uniform(0.15, 0.85, 3)
    freq = rng.uniform(2.0, 5.0, 3)
    phase = rng.uniform(0, 2 * np.pi, 3)
    check = (np.floor(p[:, 0] * freq[0]) + np.floor(p[:, 1] * freq[1]) + np.floor(p[:, 2] * freq[2])) % 2
    col = np.where(check[:, None] > 0, base, alt)
    stripes = 0.5 + 0.5 * np.sin(p @ (freq * 3.1) + phase[0])
    blobs = 0.5 + 0.5 * np.sin(7.3 * p[:, 0] + phase[1]) * np.cos(6.1 * p[:, 2] + phase[2]) * np.sin(5.7 * p[:, 1])
    col = col * (0.65 + 0.35 * stripes[:, None]) * (0.75 + 0.25 * blobs[:, None])
    return np.clip(col, 0, 1)


def make_world(rng: np.random.Generator) -> World:
    """A random arrangement of 2–4 boxes on the floor."""
    boxes = []
    for _ in range(int(rng.integers(2, 5))):
        size = rng.uniform(0.4, 1.1, 3)
        center = np.array([rng.uniform(-1.2, 1.2), size[1] / 2, rng.uniform(-1.2, 1.2)])
        boxes.append(Box(center - size / 2, center + size / 2, int(rng.integers(1 << 30))))
    return World(boxes, int(rng.integers(1 << 30)), int(rng.integers(1 << 30)))


def look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV camera-from-world ``[3, 4]`` for a camera at ``center`` looking at ``target`` (y up in the world)."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)  # points down in the image
    R = np.stack([x, y, z])
    return np.concatenate([R, (-R @ center)[:, None]], axis=1)


def render(world: World, extr: np.ndarray, K: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast one view -> (RGB uint8 ``[H, W, 3]``, z-depth float32 ``[H, W]``); background is a far wall."""
    R, t = extr[:, :3], extr[:, 3]
    origin = -R.T @ t
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)  # pixel centres
    dirs_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    dirs = dirs_cam @ R  # world directions (R^T d)
    n = dirs.shape[0]
    best = np.full(n, np.inf)
    color = np.zeros((n, 3))

    def hit_plane(axis: int, value: float, seed: int, limit: float = 1e9) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (value - origin[axis]) / dirs[:, axis]
        ok = (s > 1e-6) & (s < best)
        if not ok.any():
            return
        p = origin + s[ok, None] * dirs[ok]
        inside = np.all(np.abs(np.delete(p, axis, axis=1)) < limit, axis=1)
        idx = np.flatnonzero(ok)[inside]
        best[idx] = s[idx]
        color[idx] = _texture(p[inside], seed)

    hit_plane(1, 0.0, world.floor_seed, 6.0)  # floor
    hit_plane(2, -3.0, world.wall_seed, 6.0)  # back wall
    hit_plane(2, 3.5, world.wall_seed + 1, 6.0)  # front wall
    hit_plane(0, -3.0, world.wall_seed + 2, 6.0)  # left wall
    hit_plane(0, 3.0, world.wall_seed + 3, 6.0)  # right wall
    for box in world.boxes:
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (box.lo - origin) / dirs
            t2 = (box.hi - origin) / dirs
        tmin = np.nanmax(np.minimum(t1, t2), axis=1)
        tmax = np.nanmin(np.maximum(t1, t2), axis=1)
        ok = (tmax >= np.maximum(tmin, 1e-6)) & (tmin > 1e-6) & (tmin < best)
        if ok.any():
            best[ok] = tmin[ok]
            color[ok] = _texture(origin + tmin[ok, None] * dirs[ok], box.seed)
    miss = ~np.isfinite(best)
    color[miss] = 0.5
    best[miss] = 0.0
    depth = (best * dirs_cam[:, 2]).reshape(height, width).astype(np.float32)  # z-depth (dirs_cam z = 1)
    shade = 1.0 / (1.0 + 0.03 * best[:, None] ** 2)
    rgb = np.clip(color * (0.55 + 0.45 * shade), 0, 1).reshape(height, width, 3)
    return (rgb * 255 + 0.5).astype(np.uint8), depth


def scene_cameras(
    rng: np.random.Generator, frames: int, width: int, height: int, trajectory: str = "arc"
) -> tuple[np.ndarray, np.ndarray]:
    """Cameras around the scene centre -> (extrinsics ``[K,3,4]``, intrinsics ``[K,3,3]``).

    ``arc`` (the default, and what training renders): a jittered 40-100 degree arc. The long captures (``orbit``,
    ``walk``, ``random``) are described in :func:`long_cameras`.
    """
    fov = np.deg2rad(rng.uniform(50, 65))
    f = 0.5 * width / np.tan(fov / 2)
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    if trajectory != "arc":
        return long_cameras(rng, frames, trajectory), np.repeat(K[None], frames, 0)
    start = rng.uniform(0, 2 * np.pi)
    span = rng.uniform(np.deg2rad(40), np.deg2rad(100))
    radius = rng.uniform(2.3, 2.8)
    extr = []
    for i in range(frames):
        a = start + span * i / max(frames - 1, 1)
        center = np.array([radius * np.sin(a), rng.uniform(1.2, 1.8), radius * np.cos(a)])
        target = np.array([rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.5), rng.uniform(-0.3, 0.3)])
        extr.append(look_at(center, target))
    return np.stack(extr), np.repeat(K[None], frames, 0)


TRAJECTORIES = ("arc", "orbit", "walk", "random")


def long_cameras(rng: np.random.Generator, frames: int, trajectory: str) -> np.ndarray:
    """Camera-from-world extrinsics ``[K, 3, 4]`` of a long capture, in capture order.

    ``orbit``: one smooth turn around the scene at a gently varying radius and height, looking at its centre.
    ``walk``: one turn at uneven speed, wandering in and out and up and down, with hand-held jitter, looking at a
    point that drifts over the scene. ``random`` takes the orbit's cameras; the caller shuffles the names.
    """
    t = np.arange(frames) / frames
    start = rng.uniform(0, 2 * np.pi)
    ph = rng.uniform(0, 2 * np.pi, 6)
    tau = 2 * np.pi * t
    if trajectory in ("orbit", "random"):
        angle = start + tau
        radius = 2.55 + 0.2 * np.sin(2 * tau + ph[0])
        height = 1.5 + 0.25 * np.sin(3 * tau + ph[1])
        target = np.stack(
            [0.2 * np.sin(tau + ph[2]), 0.35 + 0.1 * np.sin(2 * tau + ph[3]), 0.2 * np.cos(tau + ph[4])], 1
        )
    elif trajectory == "walk":
        angle = start + tau + 0.4 * np.sin(2 * tau + ph[0])
        radius = 2.35 + 0.45 * np.sin(3 * tau + ph[1])  # stays between the boxes (<= 2.5 from the centre) and walls
        height = 1.55 + 0.3 * np.sin(2 * tau + ph[2])  # above every box (<= 1.1 high)
        target = np.stack(
            [0.6 * np.sin(2 * tau + ph[3]), 0.35 + 0.15 * np.sin(5 * tau + ph[4]), 0.6 * np.cos(3 * tau + ph[5])], 1
        )
        target = target + rng.normal(scale=0.03, size=target.shape)
    else:
        raise ValueError(f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {trajectory!r}")
    centers = np.stack([radius * np.sin(angle), height, radius * np.cos(angle)], 1)
    if trajectory == "walk":
        centers = centers + rng.normal(scale=0.015, size=centers.shape)
    return np.stack([look_at(c, g) for c, g in zip(centers, target)])


def write_gt_colmap(folder: Path, names: list[str], extr: np.ndarray, K: np.ndarray, width: int, height: int) -> None:
    """Ground-truth COLMAP model (cameras and posed images, no points) in ``folder``."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera(
        model="PINHOLE",
        width=width,
        height=height,
        params=[K[0, 0, 0], K[0, 1, 1], K[0, 0, 2], K[0, 1, 2]],
        camera_id=1,
    )
    rec.add_camera_with_trivial_rig(cam)
    for i, name in enumerate(names):
        img = pycolmap.Image(name=name, keypoints=np.zeros((0, 2)), camera_id=1, image_id=i + 1)
        rec.add_image_with_trivial_frame(img)
        rec.frame(i + 1).rig_from_world = pycolmap.Rigid3d(extr[i].astype(np.float64))
        rec.register_frame(i + 1)
    folder.mkdir(parents=True, exist_ok=True)
    rec.write(str(folder))


def make_scene(out: Path, seed: int, frames: int, width: int, height: int, trajectory: str = "arc") -> Path:
    """Render one scene into folder ``out`` (written to a temporary folder, then renamed).

    With ``trajectory="random"`` the frame names are a random permutation of the capture order (an unordered
    collection); ground truth is listed in name order whatever the trajectory.
    """
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {trajectory!r}")
    rng = np.random.default_rng(seed)
    world = make_world(rng)
    extr, K = scene_cameras(rng, frames, width, height, trajectory)
    if trajectory == "random":
        order = rng.permutation(frames)  # order[j]: the capture index of the frame named j
        extr, K = extr[order], K[order]
    digits = max(3, len(str(frames - 1)))  # names sort in frame order past 1000 frames
    with atomic_dir(out) as tmp:
        (tmp / "gt" / "depth").mkdir(parents=True)
        names = []
        for i in range(frames):
            rgb, depth = render(world, extr[i], K[i], width, height)
            name = f"frame_{i:0{digits}d}.png"
            Image.fromarray(rgb).save(tmp / name)
            np.save(tmp / "gt" / "depth" / f"frame_{i:0{digits}d}.npy", depth)
            names.append(name)
        gt = {
            "names": names,
            "width": width,
            "height": height,
            "extrinsics": extr.tolist(),
            "intrinsics": K.tolist(),
            "seed": seed,
        }
        if trajectory != "arc":  # the default's files stay byte-identical to earlier releases
            gt["trajectory"] = trajectory
        (tmp / "gt" / "cameras.json").write_text(json.dumps(gt))
        write_gt_colmap(tmp / "gt" / "sparse" / "0", names, extr, K, width, height)
    return out


def main(
    out: str | Path,
    scenes: int = 3,
    frames: int = 10,
    seed: int = 0,
    size: tuple[int, int] = (224, 168),
    overwrite: bool = False,
    trajectory: str = "arc",
) -> Path:
    """Write ``scenes`` synthetic scene folders ``scene_XXX`` under ``out``; existing ones kept unless ``overwrite``."""
    out = Path(out)
    for s in range(scenes):
        folder = out / f"scene_{s:03d}"
        if folder.exists() and not overwrite:
            continue
        make_scene(folder, seed * 100_003 + s, frames, size[0], size[1], trajectory)
    return out


def load_gt(scene: str | Path) -> dict:
    """Ground truth of a synthetic scene: names, extrinsics, intrinsics (numpy) and depth maps ``[K, H, W]``."""
    scene = Path(scene)
    d = json.loads((scene / "gt" / "cameras.json").read_text())
    depth = np.stack([np.load(scene / "gt" / "depth" / (Path(n).stem + ".npy")) for n in d["names"]])
    return {
        "names": d["names"],
        "extrinsics": np.array(d["extrinsics"]),
        "intrinsics": np.array(d["intrinsics"]),
        "depth": depth,
        "width": d["width"],
        "height": d["height"],
    }

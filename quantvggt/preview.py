"""A small PNG picture of a reconstruction: coloured points and camera frusta (matplotlib, Agg backend).

Written beside a scene's ``report.json`` so that a result can be judged without COLMAP; the orchestration shows it
in the run's Prefect artifact.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from quantvggt.fsutil import atomic_file

log = logging.getLogger(__name__)


@dataclass
class PreviewData:
    """What a preview shows: points (N, 3) with colours (N, 3) in 0..255, and cameras.

    ``extrinsics`` are world-to-camera (S, 3, 4) in the OpenCV convention (x right, y down, z forward);
    ``intrinsics`` (S, 3, 3); ``sizes`` (S, 2) as (width, height) in pixels.
    """

    points: np.ndarray
    colors: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    sizes: np.ndarray

    @classmethod
    def from_arrays(cls, data: Mapping[str, Any]) -> PreviewData:
        """From a mapping with ``points`` and optional ``colors``, ``extrinsics``, ``intrinsics``, ``sizes``."""
        pts = np.asarray(data["points"], dtype=np.float64).reshape(-1, 3)
        cols = np.asarray(data.get("colors", np.full_like(pts, 128)), dtype=np.float64).reshape(-1, 3)
        ext = np.asarray(data.get("extrinsics", np.zeros((0, 3, 4))), dtype=np.float64).reshape(-1, 3, 4)
        if "intrinsics" in data:
            intr = np.asarray(data["intrinsics"], dtype=np.float64).reshape(-1, 3, 3)
        else:  # a 60-degree field of view on a 4:3 frame, enough to draw a frustum
            f = 0.5 / np.tan(np.radians(30))
            intr = np.tile(np.array([[f, 0, 0.5], [0, f, 0.375], [0, 0, 1]]), (len(ext), 1, 1))
        sizes = np.asarray(data.get("sizes", np.tile([[1.0, 0.75]], (len(ext), 1))), dtype=np.float64).reshape(-1, 2)
        return cls(pts, cols, ext, intr, sizes)

    @classmethod
    def from_reconstruction(cls, rec: Any) -> PreviewData:
        """From a ``pycolmap.Reconstruction`` (registered images only)."""
        pts = [p.xyz for p in rec.points3D.values()]
        cols = [p.color for p in rec.points3D.values()]
        ext, intr, sizes = [], [], []
        for image_id in sorted(rec.images):  # in id order: the same picture whatever the map's order
            image = rec.images[image_id]
            if not image.has_pose:
                continue
            cam = rec.cameras[image.camera_id]
            ext.append(np.asarray(image.cam_from_world().matrix()))
            intr.append(np.asarray(cam.calibration_matrix()))
            sizes.append((cam.width, cam.height))
        return cls.from_arrays(
            {
                "points": np.asarray(pts).reshape(-1, 3),
                "colors": np.asarray(cols).reshape(-1, 3),
                "extrinsics": np.asarray(ext).reshape(-1, 3, 4),
                "intrinsics": np.asarray(intr).reshape(-1, 3, 3),
                "sizes": np.asarray(sizes, dtype=np.float64).reshape(-1, 2),
            }
        )


def load_preview_data(source: str | Path | Any) -> PreviewData:
    """Preview data from a scene result folder (``<scene>/sparse/0`` inside), a COLMAP model folder, a
    ``pycolmap.Reconstruction``, a mapping of arrays, or :class:`PreviewData`."""
    if isinstance(source, PreviewData):
        return source
    if isinstance(source, Mapping):
        return PreviewData.from_arrays(source)
    if isinstance(source, (str, Path)):
        import pycolmap

        folder = Path(source)
        model = folder / "sparse" / "0" if (folder / "sparse" / "0").is_dir() else folder
        if not any((model / f).is_file() for f in ("cameras.bin", "cameras.txt")):
            raise FileNotFoundError(f"{source}: no COLMAP model (cameras.bin) in it or in its sparse/0")
        return PreviewData.from_reconstruction(pycolmap.Reconstruction(str(model)))
    return PreviewData.from_reconstruction(source)


def _frustum_lines(data: PreviewData, depth: float) -> list[np.ndarray]:
    """Each camera as 8 segments (apex to 4 corners, the image rectangle), in world coordinates."""
    lines = []
    for E, K, (w, h) in zip(data.extrinsics, data.intrinsics, data.sizes):
        R, t = E[:, :3], E[:, 3]
        centre = -R.T @ t
        corners_px = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64)
        rays = corners_px @ np.linalg.inv(K).T  # camera-frame directions with z = 1
        corners = (rays * depth) @ R + centre  # R^T applied row-wise: camera -> world
        for c in corners:
            lines.append(np.stack([centre, c]))
        for i in range(4):
            lines.append(np.stack([corners[i], corners[(i + 1) % 4]]))
    return lines


def _to_plot(xyz: np.ndarray) -> np.ndarray:
    # OpenCV/COLMAP worlds from VGGT have y pointing down: plot (x, z, -y) so that "up" is up in the picture
    return np.stack([xyz[..., 0], xyz[..., 2], -xyz[..., 1]], axis=-1)


def render_preview(
    source: str | Path | Any,
    png_path: str | Path,
    max_points: int = 20_000,
    size_px: tuple[int, int] = (480, 360),
    title: str | None = None,
) -> Path:
    """Render points (in their colours) and camera frusta to a small PNG, viewed from behind the cameras."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and CI
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    data = load_preview_data(source)
    pts, cols = data.points, data.colors
    if len(pts) > max_points:  # a fixed subsample: the same picture for the same model
        keep = np.random.default_rng(0).choice(len(pts), max_points, replace=False)
        pts, cols = pts[keep], cols[keep]
    centres = np.array([-E[:, :3].T @ E[:, 3] for E in data.extrinsics]).reshape(-1, 3)
    everything = np.concatenate([pts, centres]) if len(pts) or len(centres) else np.zeros((1, 3))
    if len(pts) >= 20:  # far outliers would shrink the scene to a dot: frame the 2nd-98th percentile
        lo, hi = np.percentile(pts, 2, axis=0), np.percentile(pts, 98, axis=0)
        lo, hi = np.minimum(lo, centres.min(0, initial=np.inf)), np.maximum(hi, centres.max(0, initial=-np.inf))
    else:
        lo, hi = everything.min(0), everything.max(0)
    extent = float(np.max(hi - lo)) or 1.0
    lines = _frustum_lines(data, depth=0.08 * extent)

    dpi = 100
    fig = plt.figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    if len(pts):
        p = _to_plot(pts)
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=np.clip(cols, 0, 255) / 255.0, s=0.8, depthshade=False, linewidths=0)
    if lines:
        ax.add_collection3d(Line3DCollection([_to_plot(seg) for seg in lines], colors="crimson", linewidths=0.8))
    plo, phi = _to_plot(lo), _to_plot(hi)
    lo3, hi3 = np.minimum(plo, phi), np.maximum(plo, phi)
    mid, half = (lo3 + hi3) / 2, max(float(np.max(hi3 - lo3)) / 2, 1e-6)
    ax.set_xlim(mid[0] - half, mid[0] + half)
    ax.set_ylim(mid[1] - half, mid[1] + half)
    ax.set_zlim(mid[2] - half, mid[2] + half)
    ax.set_box_aspect((1, 1, 1))
    if len(data.extrinsics):  # look along the cameras' mean viewing direction, from a little above
        forward = _to_plot(np.mean([E[2, :3] for E in data.extrinsics], axis=0))
        forward /= np.linalg.norm(forward) or 1.0
        azim = np.degrees(np.arctan2(-forward[1], -forward[0]))
        elev = float(np.clip(np.degrees(np.arcsin(np.clip(-forward[2], -1, 1))) + 25, -80, 80))
        ax.view_init(elev=elev, azim=azim)
    ax.set_xticklabels([])
    ax.set_yticklabels([])
    ax.set_zticklabels([])
    ax.set_title(title or f"{len(data.points)} points, {len(data.extrinsics)} cameras", fontsize=9)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.93)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    # a 128-colour palette keeps the picture small enough to embed in a Prefect artifact (~3x smaller than RGBA)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(colors=128)
    png = Path(png_path)
    with atomic_file(png) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return png

"""render_preview: a small PNG of points and camera frusta, from arrays or from a COLMAP model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantvggt.preview import PreviewData, load_preview_data, render_preview


def _arrays(n_cams: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ext = np.zeros((n_cams, 3, 4))
    for i in range(n_cams):
        ext[i, :, :3] = np.eye(3)
        ext[i, :, 3] = [-0.3 * i, 0, 0]  # cameras along x, looking down +z
    K = np.array([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])
    return {
        "points": rng.normal([0, 0, 4], [1, 0.5, 0.5], (5000, 3)),
        "colors": rng.integers(0, 255, (5000, 3)),
        "extrinsics": ext,
        "intrinsics": np.tile(K, (n_cams, 1, 1)),
        "sizes": np.tile([128, 96], (n_cams, 1)),
    }


def test_preview_from_arrays_is_a_small_png(tmp_path: Path) -> None:
    png = render_preview(_arrays(), tmp_path / "sub" / "preview.png", size_px=(320, 240))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (320, 240)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # something was drawn
    assert png.stat().st_size < 60_000
    assert [p.name for p in png.parent.iterdir()] == ["preview.png"]  # written atomically, no temporaries left


def test_preview_without_points_or_intrinsics(tmp_path: Path) -> None:
    data = {"points": np.zeros((0, 3)), "extrinsics": _arrays(2)["extrinsics"]}
    assert render_preview(data, tmp_path / "p.png").is_file()


def test_preview_from_a_colmap_folder(tmp_path: Path) -> None:
    pytest.importorskip("pycolmap")
    model = tmp_path / "scene" / "sparse" / "0"
    model.mkdir(parents=True)
    # COLMAP's text format (stable across versions): one camera, two posed images, 50 red points
    (model / "cameras.txt").write_text("1 PINHOLE 128 96 100 100 64 48\n")
    (model / "images.txt").write_text("1 1 0 0 0 0 0 0 1 0.png\n\n2 1 0 0 0 -0.5 0 0 1 1.png\n\n")
    pts = np.random.default_rng(1).normal([0, 0, 4], 0.5, (50, 3))
    lines = [f"{i + 1} {x} {y} {z} 200 10 10 0\n" for i, (x, y, z) in enumerate(pts)]
    (model / "points3D.txt").write_text("".join(lines))
    data = load_preview_data(tmp_path / "scene")
    assert isinstance(data, PreviewData) and len(data.points) == 50 and len(data.extrinsics) == 2
    np.testing.assert_allclose(data.extrinsics[1, :, 3], [-0.5, 0, 0])
    assert render_preview(tmp_path / "scene", tmp_path / "scene" / "preview.png").is_file()
    with pytest.raises(FileNotFoundError, match="no COLMAP model"):
        load_preview_data(tmp_path)

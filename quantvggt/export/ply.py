"""``sparse/0/points3D.ply``: the points with colours, for point-cloud viewers and Gaussian-splatting trainers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantvggt.colmap import ColmapResult
from quantvggt.export import register_writer
from quantvggt.options import ExportOptions


def write(result: ColmapResult, folder: Path, options: ExportOptions, sources: list[Path] | None) -> dict[str, Any]:
    """Binary little-endian PLY of the model's points (xyz float32, rgb uint8)."""
    result.model.write_ply(folder / "sparse" / "0" / "points3D.ply")
    return {"ply": "sparse/0/points3D.ply"}


register_writer("ply", write, enabled=lambda o: o.ply)

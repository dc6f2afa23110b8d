"""``transforms.json`` for nerfstudio (``ns-train splatfacto --data OUT/<scene>``) and the Gaussian-splatting tools
that read it: one frame per image with its intrinsics and camera-to-world matrix in nerfstudio's (OpenGL)
convention, in the COLMAP model's world frame, and ``ply_file_path`` naming the model's points as initialisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from quantvggt.colmap import ColmapResult
from quantvggt.export import register_writer
from quantvggt.options import ExportOptions

OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # camera axes: x right, y down, z forward -> y up, z back


def transforms(result: ColmapResult, image_dir: str = "images", ply: str | None = None) -> dict[str, Any]:
    """The ``transforms.json`` document of a model (frames in the model's image order)."""
    m = result.model
    frames = []
    for i, name in enumerate(m.image_names):
        c = int(m.image_camera[i])
        fx, fy, cx, cy = (float(v) for v in m.camera_params[c])
        w, h = (int(v) for v in m.camera_sizes[c])
        w2c = np.eye(4)
        w2c[:3, :4] = m.cam_from_world[i]
        c2w = np.linalg.inv(w2c) @ OPENCV_TO_OPENGL
        frames.append(
            {
                "file_path": f"{image_dir}/{name}",
                "transform_matrix": c2w.tolist(),
                "colmap_im_id": i + 1,
                "fl_x": fx,
                "fl_y": fy,
                "cx": cx,
                "cy": cy,
                "w": w,
                "h": h,
            }
        )
    doc: dict[str, Any] = {"camera_model": "OPENCV", "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames}
    if ply:
        doc["ply_file_path"] = ply
    return doc


def write(result: ColmapResult, folder: Path, options: ExportOptions, sources: list[Path] | None) -> dict[str, Any]:
    """``folder/transforms.json``; frames name ``images/<file>`` (written by the images writer unless images=none)."""
    ply = "sparse/0/points3D.ply" if options.ply else None
    (folder / "transforms.json").write_text(json.dumps(transforms(result, ply=ply), indent=1))
    return {"nerfstudio": "transforms.json"}


register_writer("nerfstudio", write)

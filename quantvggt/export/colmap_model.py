"""``sparse/0``: the COLMAP model as binary files (cameras, images, points3D, rigs, frames), and text on request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantvggt.colmap import ColmapResult
from quantvggt.export import register_writer
from quantvggt.options import ExportOptions


def write(result: ColmapResult, folder: Path, options: ExportOptions, sources: list[Path] | None) -> dict[str, Any]:
    """``folder/sparse/0`` in COLMAP's binary format (plus ``.txt`` files with ``options.text``)."""
    sparse = result.model.write(folder / "sparse" / "0")
    if options.text:
        result.reconstruction.write_text(str(sparse))
    return {"sparse": "sparse/0", "text": options.text}


register_writer("colmap", write, enabled=lambda o: True)

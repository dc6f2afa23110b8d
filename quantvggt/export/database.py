"""``database.db``: cameras, images, keypoints and the tracks as verified matches, for ``colmap point_triangulator``
and ``colmap mapper``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantvggt.colmap import ColmapResult
from quantvggt.export import register_writer
from quantvggt.options import ExportOptions


def write(result: ColmapResult, folder: Path, options: ExportOptions, sources: list[Path] | None) -> dict[str, Any]:
    """COLMAP's SQLite database of the model, built within ``memory_budget_mb`` (:meth:`ColmapModel.write_database`)."""
    stats: dict[str, Any] = {}
    result.model.write_database(folder / "database.db", options.memory_budget_mb, stats)
    return {"database": "database.db", "database_pairs": stats}


register_writer("database", write, enabled=lambda o: o.database)

"""A run's Parquet manifest: one :class:`~quantvggt.scene.SceneResult` row per scene, written atomically."""

from __future__ import annotations

import io

from quantvggt.scene import SceneResult, manifest_schema
from quantvggt.storage import Storage


def write_manifest(results: list[SceneResult], storage: Storage, key: str) -> str:
    """Write scene results as Parquet (schema from :class:`SceneResult`) to ``key`` atomically; returns its URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([r.to_row() for r in results], schema=manifest_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(key, buf.getvalue())
    return storage.uri(key)


def read_manifest(storage: Storage, key: str) -> list[SceneResult]:
    """Scene results of the manifest at ``key`` (older manifests lacking newer columns included)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(io.BytesIO(storage.read_bytes(key))).to_pylist()
    return [SceneResult.from_row(row) for row in rows]


def markdown_table(results: list[SceneResult]) -> str:
    """Summary table (Markdown) of scene results."""
    lines = ["| scene | status | images | points | seconds | worker | error |", "|---|---|---|---|---|---|---|"]
    for r in results:
        err = r.error.replace("|", "/")[:120]
        lines.append(f"| {r.scene} | {r.status} | {r.images} | {r.points} | {r.seconds:.1f} | {r.worker} | {err} |")
    return "\n".join(lines)

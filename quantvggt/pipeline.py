"""Batch building blocks shared by the CLI, Prefect flows and Ray workers: model loading and one-scene processing."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from quantvggt.reconstruct import ReconstructionOptions
from quantvggt.reconstruct import main as reconstruct_main
from quantvggt.storage import Storage, fetch_scene, find_scenes, open_storage, split_uri

log = logging.getLogger(__name__)

ROW_FIELDS = ("scene", "status", "images", "points", "seconds", "worker", "attempt", "error", "output")


def load_model(source: str, device: str | None = None) -> torch.nn.Module:
    """A float model source (hub id, file, folder, s3://, shipped name) or a quantized checkpoint (local or s3://)."""
    from quantvggt.model import load_vggt
    from quantvggt.quant import load_quantized

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if source.startswith("s3://"):
        st = open_storage(source)
        if st.exists("quant.json"):
            return load_quantized(source, device=device)
        return load_vggt(source, device=device)
    if (Path(source) / "quant.json").is_file():
        return load_quantized(source, device=device)
    return load_vggt(source, device=device)


def expand_scene_uris(inputs: list[str]) -> list[str]:
    """Scene URIs from inputs that are scene folders/prefixes or roots holding scene folders."""
    out: list[str] = []
    for item in inputs:
        st = open_storage(item)
        scenes = find_scenes(st)
        if not scenes or scenes in (["."], [""]):
            out.append(str(item).rstrip("/"))  # a scene itself; an empty one is reported as failed, not dropped
        else:
            out += [st.uri(s) for s in scenes if s not in (".", "")]
    return sorted(dict.fromkeys(out))


def process_scene(
    model: torch.nn.Module,
    scene_uri: str,
    out_uri: str,
    options: ReconstructionOptions,
    force: bool = False,
    attempt: int = 1,
    worker: str | None = None,
) -> dict[str, Any]:
    """Fetch a scene, reconstruct it, upload ``OUT/<scene>/`` with its completion record; one result row.

    Never raises for a bad scene: failures come back as ``status="failed"`` with the error.
    """
    t0 = time.perf_counter()
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    name = scene_uri.rstrip("/").rpartition("/")[2]
    row: dict[str, Any] = {
        "scene": name,
        "status": "failed",
        "images": 0,
        "points": 0,
        "seconds": 0.0,
        "worker": worker,
        "attempt": attempt,
        "error": "",
        "output": "",
    }
    try:
        out: Storage = open_storage(out_uri)
        row["output"] = out.uri(name)
        if out.is_complete(name) and not force:
            row["status"] = "skipped"
            return row
        src, scene = split_uri(scene_uri)
        with tempfile.TemporaryDirectory(prefix="quantvggt-scene-") as tmp:
            local = fetch_scene(src, scene, Path(tmp) / "in" / scene)
            result = reconstruct_main(model, local, Path(tmp) / "out", options)
            import json

            report = json.loads((result / "report.json").read_text())
            if force:
                out.delete_prefix(name + "/")
            out.upload_dir(result, name, extra={"images": report["images"], "points": report["points"]["kept"]})
        row.update(status="done", images=report["images"], points=report["points"]["kept"])
    except Exception as e:  # one bad scene never stops the batch
        log.warning("scene %s failed: %s", scene_uri, e)
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def write_manifest(rows: list[dict[str, Any]], storage: Storage, key: str) -> str:
    """Write result rows as Parquet to ``key`` (atomic); returns its URI."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [{f: r.get(f) for f in ROW_FIELDS} for r in rows],
        schema=pa.schema(
            [
                ("scene", pa.string()),
                ("status", pa.string()),
                ("images", pa.int64()),
                ("points", pa.int64()),
                ("seconds", pa.float64()),
                ("worker", pa.string()),
                ("attempt", pa.int64()),
                ("error", pa.string()),
                ("output", pa.string()),
            ]
        ),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(key, buf.getvalue())
    return storage.uri(key)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Summary table (Markdown) of result rows."""
    lines = ["| scene | status | images | points | seconds | worker | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = str(r.get("error") or "").replace("|", "/")[:120]
        lines.append(
            f"| {r['scene']} | {r['status']} | {r['images']} | {r['points']} | {r['seconds']:.1f} | {r['worker']} | {err} |"
        )
    return "\n".join(lines)

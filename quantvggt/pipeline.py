"""Batch building blocks shared by the CLI, Prefect flows and Ray workers: model loading and one-scene processing."""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from quantvggt.reconstruct import ReconstructionOptions
from quantvggt.reconstruct import main as reconstruct_main
from quantvggt.scene import SceneResult, manifest_schema, scene_name
from quantvggt.storage import Storage, fetch_scene, find_scenes, open_storage, split_uri

log = logging.getLogger(__name__)

DEMO_RANDOM = "demo-random"  # the tiny architecture with seeded random (untrained) weights: tries commands offline


def load_model(source: str, device: str | None = None) -> torch.nn.Module:
    """A float model source (hub id, file, folder, s3://, shipped name), a quantized checkpoint, or ``demo-random``."""
    from quantvggt.model import load_vggt
    from quantvggt.quant import load_quantized

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if source == DEMO_RANDOM:
        return _demo_model().to(device)
    if source.startswith("s3://"):
        st = open_storage(source)
        if st.exists("quant.json"):
            return load_quantized(source, device=device)
        return load_vggt(source, device=device)
    if (Path(source) / "quant.json").is_file():
        return load_quantized(source, device=device)
    return load_vggt(source, device=device)


def _demo_model(seed: int = 0) -> torch.nn.Module:
    import json

    from quantvggt.model import VGGT, VGGTConfig
    from quantvggt.model.loading import ASSETS_DIR

    cfg = VGGTConfig.from_dict(json.loads((ASSETS_DIR / "vggt-tiny-config.json").read_text()))
    torch.manual_seed(seed)
    return VGGT(cfg).eval()


def expand_scene_uris(inputs: list[str]) -> list[str]:
    """Scene URIs from inputs that are scene folders/prefixes or roots holding scene folders."""
    out: list[str] = []
    for item in inputs:
        st = open_storage(item)
        scenes = find_scenes(st)
        if not scenes or scenes in (["."], [""]):
            # a scene itself (an empty one is reported as failed, not dropped); local paths absolute so '.' has a name
            out.append(str(item).rstrip("/") if "://" in str(item) else os.path.abspath(item))
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
) -> SceneResult:
    """Fetch a scene, reconstruct it, upload ``OUT/<scene>/`` with its completion record.

    Never raises for a bad scene: failures come back as ``status="failed"`` with the error.
    """
    t0 = time.perf_counter()
    result = SceneResult(
        scene=scene_uri,  # replaced by its name below, once naming cannot fail the batch
        worker=worker or f"{socket.gethostname()}:{os.getpid()}",
        attempt=attempt,
        source=scene_uri,
    )
    try:
        result.scene = name = scene_name(scene_uri)
        out: Storage = open_storage(out_uri)
        result.output, result.report = out.uri(name), out.uri(f"{name}/report.json")
        if out.is_complete(name) and not force:
            result.status = "skipped"
            return result
        src, scene = split_uri(scene_uri)
        with tempfile.TemporaryDirectory(prefix="quantvggt-scene-") as tmp:
            local = fetch_scene(src, scene, Path(tmp) / "in" / name)
            done = reconstruct_main(model, local, Path(tmp) / "out", options)
            if force:
                out.delete_prefix(name + "/")
            out.upload_dir(done.output, name, extra={"images": done.images, "points": done.points})
        result.status, result.images, result.points = "done", done.images, done.points
    except Exception as e:  # one bad scene never stops the batch
        log.warning("scene %s failed: %s", scene_uri, e)
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


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

"""Batch building blocks shared by the CLI, Prefect flows and Ray workers: model loading and one-scene processing."""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from quantvggt.fsutil import check_outputs_outside_inputs
from quantvggt.reconstruct import ReconstructionOptions
from quantvggt.reconstruct import main as reconstruct_main
from quantvggt.scene import SceneResult, manifest_schema, scene_name, scene_source_key
from quantvggt.storage import Storage, fetch_scene, find_scenes, open_storage, split_uri

log = logging.getLogger(__name__)

PREVIEW = "preview.png"  # the picture of a scene's reconstruction, beside its report.json
DEMO_RANDOM = "demo-random"  # the tiny architecture with seeded random (untrained) weights: tries commands offline


def load_model(source: str, device: str | None = None, compile: bool = False) -> torch.nn.Module:
    """A float model source (hub id, file, folder, s3://, shipped name), a quantized checkpoint, or ``demo-random``.

    ``compile=True`` returns it ``torch.compile``-d (zero graph breaks; quantized layers run as custom ops).
    """
    model = _load_model(source, device)
    return model.compile_() if compile else model


def _load_model(source: str, device: str | None = None) -> torch.nn.Module:
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
    name: str | None = None,
    checkpoint: str = "",
) -> SceneResult:
    """Fetch a scene, reconstruct it, upload ``OUT/<name>/`` (with ``preview.png``) and its completion record.

    ``name`` defaults to :func:`scene_name` (callers with several sources pass :func:`output_names`' choice). The
    completion record carries the source URI, ``checkpoint`` and the options; a finished result counts as done only
    for the same source: ``OUT/<name>`` holding another source's result fails this scene instead of skipping it
    (``force`` replaces it). Never raises for a bad scene: failures come back as ``status="failed"`` with the error.
    """
    t0 = time.perf_counter()
    result = SceneResult(
        scene=scene_uri,  # replaced by its name below, once naming cannot fail the batch
        worker=worker or f"{socket.gethostname()}:{os.getpid()}",
        attempt=attempt,
        source=scene_uri,
    )
    local: Path | None = None
    try:
        result.scene = name = name or scene_name(scene_uri)
        out: Storage = open_storage(out_uri)
        result.output, result.report = out.uri(name), out.uri(f"{name}/report.json")
        check_outputs_outside_inputs([result.output], [scene_uri])  # else force/upload replace the scene's images
        record = None if force else out.completion_record(name)
        if record is not None:
            if record.get("source") in (None, "", scene_source_key(scene_uri)):  # records without a source: older
                result.status = "skipped"
                return result
            raise ValueError(
                f"{out.uri(name)} holds the result of another scene folder with the same name ({record['source']}); "
                "rename one, reconstruct with on_collision='suffix', or force to replace it"
            )
        src, scene = split_uri(scene_uri)
        with tempfile.TemporaryDirectory(prefix="quantvggt-scene-") as tmp:
            local = fetch_scene(src, scene, Path(tmp) / "in" / name)
            # the fetched scene is a temporary folder, gone after the upload: the workspace's images are copies
            opts = replace(options, images="copy") if options.images == "link" else options
            done = reconstruct_main(model, local, Path(tmp) / "out", opts)
            if force:
                out.delete_prefix(name + "/")
            write_preview(Path(done.output))
            record = {
                "images": done.images,
                "points": done.points,
                "source": scene_source_key(scene_uri),
                "checkpoint": checkpoint,
                "options": asdict(options),
            }
            out.upload_dir(done.output, name, extra=record)
        result.status, result.images, result.points = "done", done.images, done.points
    except Exception as e:  # one bad scene never stops the batch
        log.warning("scene %s failed: %s", scene_uri, e)
        result.error = f"{type(e).__name__}: {e}"
        if local is not None:  # name the scene as the user gave it, not its temporary copy
            result.error = result.error.replace(str(local), scene_uri)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def write_preview(result_folder: Path) -> Path | None:
    """``preview.png`` beside ``report.json``; a picture that cannot be drawn is logged and never fails the scene."""
    from quantvggt.preview import render_preview

    try:
        return render_preview(result_folder, result_folder / PREVIEW)
    except Exception as e:
        log.warning("no preview for %s: %s: %s", result_folder.name, type(e).__name__, e)
        return None


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

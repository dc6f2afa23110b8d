"""Reconstruct flows: discover scenes, skip finished ones, fan out to Ray actors, write a Parquet manifest + summary."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from quantvggt.pipeline import expand_scene_uris, markdown_table, write_manifest
from quantvggt.reconstruct import ReconstructionOptions
from quantvggt.scene import SceneResult, scene_name
from quantvggt.storage import open_storage


@task(name="discover-scenes")
def discover(scenes: list[str], out: str, force: bool) -> tuple[list[str], list[SceneResult]]:
    """Scene URIs still to do, and 'skipped' results for those already complete in ``out``."""
    store = open_storage(out)
    todo, skipped = [], []
    for uri in expand_scene_uris(scenes):
        try:
            name = scene_name(uri)
        except ValueError:  # left to the workers, whose failed result says why
            todo.append(uri)
            continue
        if not force and store.is_complete(name):
            output, report = store.uri(name), store.uri(f"{name}/report.json")
            skipped.append(SceneResult(name, "skipped", output=output, report=report, source=uri))
        else:
            todo.append(uri)
    return todo, skipped


@task(name="ray-batch")
def run_batch(
    scene_uris: list[str],
    checkpoint: str,
    out: str,
    options: dict[str, Any],
    num_workers: int,
    force: bool,
    ray_address: str | None,
) -> list[SceneResult]:
    """Drive plain Ray actors from this task (no per-worker Prefect servers)."""
    from workers.reconstruct import ensure_ray, run_scenes

    if not scene_uris:
        return []
    ensure_ray(ray_address, num_cpus=max(num_workers, 1))
    return run_scenes(
        scene_uris, checkpoint, out, ReconstructionOptions(**options), num_workers=num_workers, force=force
    )


@flow(name="reconstruct")
def reconstruct(
    scenes: list[str] | str,
    checkpoint: str,
    out: str,
    options: dict[str, Any] | None = None,
    force: bool = False,
    num_workers: int = 2,
    ray_address: str | None = None,
) -> str:
    """Reconstruct scene folders (local or s3://) with a (quantized) checkpoint; returns the manifest URI."""
    logger = get_run_logger()
    scenes = [scenes] if isinstance(scenes, str) else list(scenes)
    todo, skipped = discover(scenes, out, force)
    logger.info("%d scenes to reconstruct, %d already complete", len(todo), len(skipped))
    results = skipped + run_batch(todo, checkpoint, out, options or {}, num_workers, force, ray_address)
    store = open_storage(out)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    manifest = write_manifest(results, store, f"_manifests/{run_id}.parquet")
    table = markdown_table(results)
    create_markdown_artifact(
        markdown=f"# Reconstruction {run_id}\n\nmanifest: `{manifest}`\n\n{table}\n",
        key="reconstruct-summary",
        description="scenes, images, points, seconds per scene",
    )
    failed = [r.scene for r in results if not r.ok]
    if failed:
        logger.warning("%d scenes failed: %s", len(failed), ", ".join(failed))
    return manifest


@flow(name="reconstruct-nightly")
def reconstruct_nightly(
    inbox: str,
    checkpoint: str,
    out: str,
    options: dict[str, Any] | None = None,
    num_workers: int = 2,
    ray_address: str | None = None,
) -> str:
    """Scan ``inbox`` for scene folders not yet complete in ``out`` and reconstruct them."""
    return reconstruct([inbox], checkpoint, out, options, False, num_workers, ray_address)

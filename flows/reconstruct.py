"""Reconstruct flows: check parameters, find scenes, fan out to Ray actors, write a manifest, show what happened.

A run writes what it can whatever fails: a Parquet manifest with one row per scene (a local copy under the cache
folder when the output store cannot be written), a table, a Markdown summary (full errors, previews) and links as
Prefect artifacts, and a progress artifact while scenes are reconstructed. More failed scenes than
``allowed_failures`` (default 0) end the run **Failed** (:class:`ScenesFailedError`, which names the manifest).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import route_library_logs
from flows.params import ParameterError, check_inbox, check_storage_root, require, resolve_checkpoint
from flows.report import browse_url, read_previews, scene_rows, summary_markdown
from quantvggt.batch import name_outputs
from quantvggt.fsutil import is_within
from quantvggt.manifest import write_manifest
from quantvggt.options import BatchOptions, ReconstructionOptions, coerce
from quantvggt.scene import SceneResult, scene_label
from quantvggt.storage import (
    StorageError,
    StorageUnavailableError,
    cache_dir,
    expand_scene_uris,
    open_storage,
)

route_library_logs()
Collision = Literal["error", "suffix"]
RETRY_DELAYS_S = [30, 120]  # storage outages outlast botocore's per-request retries (seconds)


class ScenesFailedError(RuntimeError):
    """More scenes failed than the run allows; ``manifest`` is where every scene's row is."""

    def __init__(self, message: str, manifest: str = "") -> None:
        super().__init__(message)
        self.manifest = manifest

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect pickles the exception as the run's result
        return (type(self), (str(self), self.manifest))


def storage_outage(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when storage was unreachable (nothing else passes later)."""
    try:
        state.result()
    except StorageUnavailableError:
        return True
    except Exception:
        return False
    return False


@task(name="discover-scenes", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=storage_outage)  # fmt: skip
def discover(
    scenes: list[str], out: str, force: bool, on_collision: Collision
) -> tuple[list[tuple[str, str]], list[SceneResult]]:
    """(scene URI, output name) pairs to reconstruct, and the results decided here (complete, unlistable, colliding).

    A scene counts as complete only if its completion record names the same source; a result of another source
    under the same name fails the scene (``on_collision="error"``) or sends it to ``<name>-<hash of its parent>``.
    """
    logger = get_run_logger()
    decided: list[SceneResult] = []
    uris: list[str] = []
    for item in scenes:
        try:
            uris += expand_scene_uris([item])
        except StorageUnavailableError:
            raise  # the task is retried for an outage
        except (StorageError, OSError, ValueError) as e:  # this input only: the others go on
            decided.append(SceneResult(scene_label(item), error=f"cannot list scenes: {e}", source=item))
    # an output root inside an inbox holds result folders with images/: they are our outputs, never new scenes
    ours = [u for u in uris if is_within(u, out)]
    if ours:
        logger.info("%d folders under the output %s left out (our results, not scenes)", len(ours), out)
    uris = [u for u in uris if u not in ours]
    todo, named = name_outputs(list(dict.fromkeys(uris)), out, on_collision, force)
    for uri, name in todo:
        if name != scene_label(uri):
            logger.info("%s goes to %s (another source holds %s)", uri, name, scene_label(uri))
    return todo, decided + named


@task(name="ray-batch", cache_policy=NO_CACHE)
def run_batch(
    todo: list[tuple[str, str]], checkpoint: str, out: str, options: ReconstructionOptions, batch: BatchOptions
) -> list[SceneResult]:
    """Reconstruct on Ray actors driven from this task; every scene gets a result, whatever fails on the way.

    A scene over ``max_frames`` images has its chunks spread over all the actors (map) and merged on one (reduce).
    """
    from workers.reconstruct import ensure_ray, run_scenes

    logger = get_run_logger()
    if not todo:
        return []
    uris, names = [u for u, _ in todo], dict(todo)
    results: dict[str, SceneResult] = {}
    progress = create_progress_artifact(0.0, key="reconstruct-progress", description=f"{len(todo)} scenes")

    def on_result(r: SceneResult) -> None:  # each scene's line is logged by the workers' logger (routed here)
        results[r.source] = r
        if not r.ok:  # the full reason in the run's own log, whatever the workers' log routing
            logger.warning("scene %s failed: %s", r.scene, r.error)
        update_progress_artifact(progress, 100.0 * len(results) / len(todo), f"{len(results)} of {len(todo)} scenes")

    try:
        where = ensure_ray(batch.ray_address, num_cpus=batch.num_workers * batch.cpus_per_worker)
        logger.info(
            "reconstructing %d scenes on %d Ray workers of %d CPUs (%s)",
            len(todo),
            batch.num_workers,
            batch.cpus_per_worker,
            where,
        )
        run_scenes(
            uris,
            checkpoint,
            out,
            options,
            num_workers=batch.num_workers,
            cpus_per_worker=batch.cpus_per_worker,
            in_flight=batch.in_flight,
            force=batch.force,
            max_attempts=batch.max_attempts,
            capacity_timeout_s=batch.capacity_timeout_s,
            item_timeout_s=batch.scene_timeout_s,
            kernels=batch.kernels,
            names=names,
            on_result=on_result,
        )
    except Exception as e:  # Ray unreachable or the batch broke: the scenes without a result get this error
        logger.error("batch stopped: %s: %s", type(e).__name__, e)
        for uri in uris:
            if uri not in results:
                on_result(SceneResult(names[uri], error=f"batch failed: {type(e).__name__}: {e}", source=uri))
    return [results[u] for u in uris]


@task(name="write-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=storage_outage)  # fmt: skip
def save_manifest(results: list[SceneResult], out: str, run_name: str) -> str:
    """The run's Parquet manifest in ``OUT/_manifests/``; returns its URI."""
    return write_manifest(results, open_storage(out), f"_manifests/{run_name}.parquet")


def _manifest_anyway(results: list[SceneResult], out: str, run_name: str) -> tuple[str, str]:
    """(manifest URI, why it is not in ``out``): ``out`` if it can be written, else a local copy under the cache."""
    try:
        return save_manifest(results, out, run_name), ""
    except Exception as e:
        local = open_storage(cache_dir() / "manifests")
        return write_manifest(results, local, f"{run_name}.parquet"), f"{type(e).__name__}: {e}"


def _publish(results: list[SceneResult], out: str, manifest: str, title: str) -> None:
    """Table, Markdown (with previews) and link artifacts of the run."""
    try:
        previews = read_previews(open_storage(out), results)
    except Exception:  # pictures are a bonus: the store may be the thing that failed
        previews = {}
    create_table_artifact(scene_rows(results), key="reconstruct-scenes", description=f"{title}: one row per scene")
    create_markdown_artifact(summary_markdown(title, results, manifest, previews), key="reconstruct-summary")
    create_link_artifact(browse_url(manifest), link_text=manifest, key="reconstruct-manifest")
    create_link_artifact(browse_url(out), link_text=out, key="reconstruct-output")


@flow(name="reconstruct", persist_result=True)
def reconstruct(
    scenes: list[str] | str,
    checkpoint: str,
    out: str,
    options: ReconstructionOptions | None = None,
    batch: BatchOptions | None = None,
) -> str:
    """Reconstruct scene folders (local or any storage URI) into ``out``; returns the manifest URI.

    ``options`` say how each scene is read, predicted (scenes over ``max_frames`` readable images in chunks fanned
    out over the Ray workers) and exported; ``batch`` how the run goes: Ray workers, name collisions ("error": two
    sources with one folder name fail; "suffix": ``<name>-<hash>``), and ``allowed_failures`` (more failed scenes end
    the run Failed, after the manifest and artifacts are written).
    """
    logger = get_run_logger()
    scenes = [scenes] if isinstance(scenes, str) else list(scenes)
    require(scenes=scenes, checkpoint=checkpoint, out=out)
    try:  # bad options fail before any work, in one line (Prefect has already checked their types)
        options, batch = coerce(ReconstructionOptions, options), coerce(BatchOptions, batch)
    except (TypeError, ValueError) as e:
        raise ParameterError(f"options: {e}") from e
    check_storage_root(out)
    run_name = time.strftime("%Y%m%dT%H%M%S") + "-" + (flow_run.get_name() or "local")
    try:
        model, model_error = resolve_checkpoint(checkpoint), ""
    except (ParameterError, StorageError) as e:  # deterministic: no worker is started, every scene says why
        model, model_error = checkpoint, str(e)
    try:
        todo, decided = discover(scenes, out, batch.force, batch.on_collision)
    except Exception as e:  # nothing could be listed, even after retries: one row per input says why
        todo, decided = [], [SceneResult(scene_label(s), error=f"cannot list scenes: {e}", source=s) for s in scenes]
    logger.info("%d scenes to reconstruct, %d decided without a worker", len(todo), len(decided))
    if model_error:
        logger.error("checkpoint unusable: %s", model_error)
        batch_results = [SceneResult(n, error=f"checkpoint unusable: {model_error}", source=u) for u, n in todo]
    else:
        batch_results = run_batch(todo, model, out, options, batch)
    results = decided + batch_results
    manifest, not_in_out = _manifest_anyway(results, out, run_name)
    if not_in_out:
        logger.error("manifest not written to %s (%s); a copy is at %s", out, not_in_out, manifest)
    _publish(results, out, manifest, f"Reconstruction {run_name}")
    failed = [r for r in results if not r.ok]
    if len(failed) > batch.allowed_failures or not_in_out:
        names = ", ".join(r.scene for r in failed[:10]) + (" ..." if len(failed) > 10 else "")
        raise ScenesFailedError(
            f"{len(failed)} of {len(results)} scenes failed ({names}); first error: {failed[0].error if failed else ''}"
            f"{'; manifest not written to the output: ' + not_in_out if not_in_out else ''}; manifest: {manifest}",
            manifest,
        )
    if failed:
        logger.warning("%d scenes failed (allowed: %d): %s", len(failed), batch.allowed_failures, manifest)
    return manifest


@flow(name="reconstruct-nightly", persist_result=True)
def reconstruct_nightly(
    inbox: str,
    checkpoint: str,
    out: str,
    options: ReconstructionOptions | None = None,
    batch: BatchOptions | None = None,
) -> str:
    """Scan ``inbox`` for scene folders not yet complete in ``out`` (for that source) and reconstruct them.

    ``options`` and ``batch`` as :func:`reconstruct` (``force`` is ignored: a nightly run never redoes finished scenes).
    """
    check_inbox(inbox)
    batch = coerce(BatchOptions, batch)
    return reconstruct([inbox], checkpoint, out, options, replace(batch, force=False))

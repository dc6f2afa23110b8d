"""The Ray side of one scene: the steps of :mod:`quantvggt.reconstruct`, cut where work can move between processes.

The pieces run inside :class:`workers.reconstruct.ReconstructionWorker` actors (which hold the model); the driver
loop in :func:`workers.reconstruct.run_scenes` decides where each runs:

- **start** (:func:`start_scene`): a scene within the single-pass limit is reconstructed whole, right there
  (:func:`quantvggt.reconstruct.reconstruct`); a larger one is planned (:func:`quantvggt.reconstruct.plan_scene`)
  and comes back as a :class:`~quantvggt.reconstruct.ScenePlan`;
- **map** (:func:`predict_chunk`): one chunk's images only (local, or downloaded), predicted and returned as numpy
  arrays (:func:`quantvggt.chunking.prediction_to_arrays`);
- **reduce** (:func:`reduce_scene`): the chunks fetched one at a time into :func:`quantvggt.reconstruct.merge`, then
  :func:`quantvggt.reconstruct.export_and_commit`.

No process holds every image of the scene: a map task holds its chunk, the reduce task the merged per-frame maps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from quantvggt.chunking import prediction_from_arrays, prediction_to_arrays
from quantvggt.reconstruct import (
    SceneJob,
    ScenePlan,
    check_output,
    count_images,
    export_and_commit,
    guarded,
    merge,
    plan_scene,
    predict_chunks,
    reconstruct,
    scene_folder,
)
from quantvggt.reconstruct import predict_chunk as predict_chunk_here
from quantvggt.scene import SceneResult

__all__ = ["ScenePlan", "predict_chunk", "reduce_scene", "start_scene"]


def start_scene(
    model: torch.nn.Module, job: SceneJob, attempt: int = 1, worker: str | None = None
) -> SceneResult | ScenePlan:
    """Reconstruct a scene that fits one pass (a :class:`SceneResult`), else plan its chunks (a :class:`ScenePlan`).

    Never raises for a bad scene: failures come back as a failed :class:`SceneResult`.
    """

    def start() -> SceneResult | ScenePlan:
        skipped = check_output(job)
        if skipped is not None:
            return skipped
        if job.options.memory_budget_mb is None and count_images(job.source) <= job.options.max_frames:
            return reconstruct(model, job)  # no need to scan first: it fits one pass whatever is readable
        with scene_folder(job.source) as folder:  # a remote scene: every image on this disk, for the scan
            plan = plan_scene(model, job, folder)
            if plan.plan is None:  # fits after all (unreadable files, or the memory budget allows it)
                return export_and_commit(plan, merge(plan, predict_chunks(model, plan, folder), model), folder)
        return plan

    return guarded(start, job.source, job.name, attempt, worker)


def predict_chunk(model: torch.nn.Module, plan: ScenePlan, k: int) -> dict[str, Any]:
    """Chunk ``k`` (its images only), predicted and returned as arrays, frames in the plan's order."""
    t0 = time.perf_counter()
    with scene_folder(plan.job.source, plan.chunk_names(k)) as folder:
        fetch = time.perf_counter() - t0
        pred = predict_chunk_here(model, plan, k, folder)
    data = prediction_to_arrays(pred, point_map=plan.job.options.points_from == "point_map")  # the rest is unread
    data["timings_s"]["fetch"] = fetch
    return data


def reduce_scene(
    model: torch.nn.Module,
    plan: ScenePlan,
    metas: list[dict[str, Any]],
    get_chunk: Callable[[int], dict[str, Any]],
    attempt: int = 1,
    worker: str | None = None,
) -> SceneResult:
    """Merge the chunks (fetched one at a time by ``get_chunk(k)``), export and commit ``OUT/<name>``.

    ``metas[k]`` says how chunk ``k``'s map went: ``error`` (empty if it succeeded), ``worker``, ``seconds``,
    ``attempt``. Never raises for a bad scene: failures come back as a failed :class:`SceneResult`.
    """

    def reduce() -> SceneResult:
        t0 = time.perf_counter()
        outcomes = (
            (meta, None if meta.get("error") else prediction_from_arrays(get_chunk(k))) for k, meta in enumerate(metas)
        )
        merged = merge(plan, outcomes, model)
        merged.report["timings_s"]["reduce"] = round(time.perf_counter() - t0, 4)  # fetch + align + merge here
        images = None if plan.job.options.images == "none" else list(merged.names)
        with scene_folder(plan.job.source, images) if images else contextlib.nullcontext(None) as folder:
            return export_and_commit(plan, merged, folder)

    return guarded(reduce, plan.job.source, plan.job.name, attempt, worker)

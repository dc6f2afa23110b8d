"""Map/reduce of one large scene over Ray workers: plan, predict each chunk where a worker is free, merge once.

The pieces run inside :class:`workers.reconstruct.ReconstructionWorker` actors (which hold the model); the driver
loop in :func:`workers.reconstruct.run_scenes` sends them out:

- **plan** (:func:`start_scene`): a scene of at most ``max_frames`` images is reconstructed whole, right there, as
  before (:func:`quantvggt.pipeline.process_scene`); a larger one is scanned (readable images, frame limits under
  the memory budget) and planned (:func:`quantvggt.chunking.plan_scene`), which comes back as a :class:`ScenePlan`;
- **map** (:func:`predict_chunk`): one chunk's images only, read from the local scene folder or downloaded from S3
  into a temporary folder, predicted in one forward pass and returned as numpy arrays
  (:func:`quantvggt.chunking.prediction_to_arrays`);
- **reduce** (:func:`reduce_scene`): the chunks fetched one at a time, in plan order, into a
  :class:`quantvggt.chunking.ChunkMerger` (a chunk whose map failed goes in through ``ChunkMerger.fail`` with its
  error), then the COLMAP export, ``report.json`` and the upload with its completion record.

No process holds every image of the scene: a map task holds its chunk, the reduce task the merged per-frame maps.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from quantvggt.chunking import (
    ChunkMerger,
    ChunkPlan,
    prediction_from_arrays,
    prediction_to_arrays,
    select_frames,
)
from quantvggt.colmap import to_colmap
from quantvggt.fsutil import check_outputs_outside_inputs
from quantvggt.images import IMAGE_EXTENSIONS, reference_first
from quantvggt.pipeline import process_scene, write_preview
from quantvggt.prediction import ScenePrediction
from quantvggt.reconstruct import (
    ReconstructionOptions,
    align_options,
    chunk_plan,
    frame_limits,
    predict_frames,
    scan_scene,
    write_scene,
)
from quantvggt.scene import SceneResult, scene_name, scene_source_key
from quantvggt.storage import fetch_scene, open_storage, split_uri

log = logging.getLogger(__name__)


@dataclass
class ScenePlan:
    """A scene to be reconstructed in chunks: what the map and reduce tasks need to know about it."""

    scene_uri: str
    name: str  # output name: OUT/<name>
    names: list[str]  # readable image file names, in scene order (the first is the reference frame)
    plan: ChunkPlan
    chunk_size: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable files and why
    memory: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)  # scan and plan, on the planning worker
    started: float = field(default_factory=time.time)  # wall clock when planning began (for the scene's total)

    def chunk_names(self, k: int) -> list[str]:
        """File names of chunk ``k``'s images, in the plan's chunk order."""
        return [self.names[i] for i in self.plan.chunks[k]]


def worker_name() -> str:
    """``host:pid`` of this process, as scene results name their worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _count_images(scene_uri: str) -> int:
    """Image files directly in the scene (by extension; unread): an upper bound on its readable images."""
    src, scene = split_uri(scene_uri)
    prefix = scene.rstrip("/") + "/"
    keys = [k[len(prefix) :] for k in src.list(prefix)]
    return sum("/" not in k and Path(k).suffix.lower() in IMAGE_EXTENSIONS for k in keys)


def _check_output(scene_uri: str, out_uri: str, name: str, force: bool) -> bool:
    """True if ``OUT/<name>`` already holds this scene's result (skip); raises if it holds another source's."""
    out = open_storage(out_uri)
    check_outputs_outside_inputs([out.uri(name)], [scene_uri])  # else force/upload would replace the scene's images
    record = None if force else out.completion_record(name)
    if record is None:
        return False
    if record.get("source") in (None, "", scene_source_key(scene_uri)):
        return True
    raise ValueError(
        f"{out.uri(name)} holds the result of another scene folder with the same name ({record['source']}); "
        "rename one, reconstruct with on_collision='suffix', or force to replace it"
    )


def start_scene(
    model: torch.nn.Module,
    scene_uri: str,
    out_uri: str,
    options: ReconstructionOptions,
    force: bool = False,
    attempt: int = 1,
    worker: str | None = None,
    name: str | None = None,
    checkpoint: str = "",
) -> SceneResult | ScenePlan:
    """Reconstruct a scene that fits one pass (a :class:`SceneResult`), else plan its chunks (a :class:`ScenePlan`).

    Never raises for a bad scene: failures come back as a failed :class:`SceneResult`.
    """
    worker = worker or worker_name()
    whole = lambda: process_scene(  # the one-pass path, unchanged
        model, scene_uri, out_uri, options, force, attempt, worker, name, checkpoint
    )
    t0, started = time.perf_counter(), time.time()
    result = SceneResult(scene_uri, worker=worker, attempt=attempt, source=scene_uri)
    try:
        result.scene = name = name or scene_name(scene_uri)
        if options.memory_budget_mb is None and _count_images(scene_uri) <= options.max_frames:
            return whole()
        out = open_storage(out_uri)
        result.output, result.report = out.uri(name), out.uri(f"{name}/report.json")
        if _check_output(scene_uri, out_uri, name, force):
            result.status = "skipped"
            return result
        with tempfile.TemporaryDirectory(prefix="quantvggt-plan-") as tmp:
            folder = _local_scene(scene_uri, Path(tmp) / name)  # S3: every image on this disk, one at a time
            paths, skipped = scan_scene(folder)
            limit, chunk_size, memory = frame_limits(model, paths, options)
            if len(paths) <= limit:
                return whole()
            t_scan = time.perf_counter() - t0
            plan = chunk_plan(paths, chunk_size, options)
        log.info("%s: %d images in %d chunks of up to %d", name, len(paths), len(plan.chunks), chunk_size)
        timings = {"scan": t_scan, "plan": time.perf_counter() - t0 - t_scan}
        return ScenePlan(scene_uri, name, [p.name for p in paths], plan, chunk_size, skipped, memory, timings, started)
    except Exception as e:  # one bad scene never stops the batch
        log.warning("scene %s failed: %s", scene_uri, e)
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _local_scene(scene_uri: str, dest: Path, names: list[str] | None = None) -> Path:
    """A local folder holding the scene's images (``names`` only, if given): the scene itself, or a download."""
    if "://" not in scene_uri:
        return Path(scene_uri)
    src, scene = split_uri(scene_uri)
    if names is None:
        return fetch_scene(src, scene, dest)
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        src.download(f"{scene}/{n}", dest / n)
    return dest


def predict_chunk(
    model: torch.nn.Module, scene_uri: str, names: list[str], options: ReconstructionOptions, scene: str = ""
) -> dict[str, Any]:
    """One chunk (its images only), predicted and returned as arrays, frames in ``names`` order."""
    with tempfile.TemporaryDirectory(prefix="quantvggt-chunk-") as tmp:
        t0 = time.perf_counter()
        folder = _local_scene(scene_uri, Path(tmp) / "in", names)
        fetch = time.perf_counter() - t0
        frames = [folder / n for n in names]
        order = [frames.index(p) for p in reference_first(frames)]  # a non-blank reference frame per chunk
        pred = predict_frames(model, [frames[j] for j in order], options, scene)
    pred = select_frames(pred, [order.index(j) for j in range(len(names))])  # back to the plan's order
    data = prediction_to_arrays(pred, point_map=options.points_from == "point_map")  # the rest is never read
    data["timings_s"]["fetch"] = fetch
    return data


def reduce_scene(
    model: torch.nn.Module,
    plan: ScenePlan,
    metas: list[dict[str, Any]],
    get_chunk: Callable[[int], dict[str, Any]],
    out_uri: str,
    options: ReconstructionOptions,
    force: bool = False,
    attempt: int = 1,
    worker: str | None = None,
    checkpoint: str = "",
) -> SceneResult:
    """Align and merge the chunks (fetched one at a time by ``get_chunk(k)``), export COLMAP, upload ``OUT/<name>``.

    ``metas[k]`` says how chunk ``k``'s map went: ``error`` (empty if it succeeded), ``worker``, ``seconds``,
    ``attempt``. Never raises for a bad scene: failures come back as a failed :class:`SceneResult`.
    """
    t0 = time.perf_counter()
    worker = worker or worker_name()
    out = open_storage(out_uri)
    result = SceneResult(
        plan.name,
        worker=worker,
        attempt=attempt,
        source=plan.scene_uri,
        output=out.uri(plan.name),
        report=out.uri(f"{plan.name}/report.json"),
    )
    try:
        merged = _merge(plan, metas, get_chunk, options)
        merged.report = {
            "scene": plan.name,
            "images_used": list(merged.names),
            "images_skipped": plan.skipped,
            **merged.report,
            **({"memory": plan.memory} if plan.memory else {}),
            "model_source": str(getattr(model, "source", None)),
            "quantization": (getattr(model, "quant_meta", None) or {}).get("config"),
            "attention": getattr(getattr(getattr(model, "config", None), "aggregator", None), "attention", None),
        }
        colmap = to_colmap(merged, options)
        with tempfile.TemporaryDirectory(prefix="quantvggt-reduce-") as tmp:
            opts, source = options, None
            if options.images != "none":  # images/ of the workspace: linked from a local scene, else copies
                source = _local_scene(plan.scene_uri, Path(tmp) / "in" / plan.name, list(merged.names))
                if "://" in plan.scene_uri and options.images == "link":
                    opts = replace(options, images="copy")  # the download is temporary
            timings = merged.report["timings_s"]
            timings["reduce"] = round(time.perf_counter() - t0, 4)
            timings["total"] = round(time.time() - plan.started, 4)
            done = write_scene(merged, colmap, Path(tmp) / "out", opts, source=source)
            if force:
                out.delete_prefix(plan.name + "/")
            write_preview(done)
            record = {
                "images": len(merged.names),
                "points": colmap.report["points"]["kept"],
                "source": scene_source_key(plan.scene_uri),
                "checkpoint": checkpoint,
                "options": asdict(options),
            }
            out.upload_dir(done, plan.name, extra=record)
        result.status, result.images, result.points = "done", len(merged.names), record["points"]
    except Exception as e:  # one bad scene never stops the batch
        log.warning("scene %s failed: %s", plan.scene_uri, e)
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = round(time.time() - plan.started, 3)
    return result


def _merge(
    plan: ScenePlan,
    metas: list[dict[str, Any]],
    get_chunk: Callable[[int], dict[str, Any]],
    opts: ReconstructionOptions,
) -> ScenePrediction:
    """The merged prediction, its report holding the chunking (with each chunk's worker and timings) and timings."""
    align = align_options(opts)
    merger = ChunkMerger(plan.plan, plan.names, align)
    timings = {**plan.timings_s, "fetch": 0.0, "load": 0.0, "model": 0.0, "align": 0.0}
    per_chunk: list[dict[str, Any]] = []
    for k, meta in enumerate(metas):
        entry = {"worker": meta.get("worker", ""), "attempt": meta.get("attempt", 1)}
        if meta.get("error"):
            merger.fail(f"prediction failed: {meta['error']}")
            per_chunk.append(entry)
            continue
        pred = prediction_from_arrays(get_chunk(k))
        chunk_times = pred.report["timings_s"]
        for key in ("fetch", "load", "model"):
            timings[key] += chunk_times.get(key, 0.0)
        t = time.perf_counter()
        merger.add(pred)
        timings["align"] += time.perf_counter() - t
        per_chunk.append({**entry, "timings_s": {key: round(v, 4) for key, v in chunk_times.items()}})
        del pred  # one chunk's maps in this process at a time
    t = time.perf_counter()
    merged = merger.result()
    timings["merge"] = time.perf_counter() - t
    for entry, extra in zip(merged.report["chunking"]["per_chunk"], per_chunk):
        entry.update(extra)
    merged.scene = plan.name
    merged.report.update(
        model_input_hw=[int(v) for v in merged.depth.shape[1:]],
        chunk_size=plan.chunk_size,
        timings_s={key: round(v, 4) for key, v in timings.items()},  # summed over chunks (CPU-seconds of the map)
    )
    return merged

"""One scene, start to finish, the same way everywhere: plan -> predict (whole or in chunks) -> merge -> export ->
commit. The CLI, the Prefect flows and the Ray workers all call this module; Ray only decides where chunks run.

- **plan** (:func:`plan_scene`): the output is checked first (never over an input; a finished result of the same
  source is skipped; another source's result under the same name is refused), then the readable images are scanned
  and the frame limits applied: a scene within the single-pass limit is one chunk of every frame, a larger one
  overlapping chunks (:mod:`quantvggt.chunking`). A :class:`ScenePlan` holds only names, so it travels between
  processes.
- **predict** (:func:`predict_chunk`): one chunk's images, one forward pass, frames in the plan's order.
- **merge** (:func:`merge`): chunk predictions taken one at a time, aligned by Sim(3) into one world (a one-chunk
  plan is its prediction); a chunk that failed is reported, never dropped silently.
- **export + commit** (:func:`export_and_commit`): COLMAP model and workspace (:mod:`quantvggt.export`), report.json
  and preview.png, then the completion record last: a local output folder is renamed into place whole, a remote one
  uploaded with the record written after every file (:mod:`quantvggt.storage`).

:func:`reconstruct` runs all of it in one process and raises for a scene that cannot be reconstructed;
:func:`process_scene` is the same but returns a failed :class:`SceneResult` instead (batches go on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from quantvggt.chunking import ChunkMerger, ChunkPlan, select_frames
from quantvggt.colmap import ColmapResult, to_colmap
from quantvggt.export import check_formats, write_workspace
from quantvggt.fsutil import atomic_dir, check_destination, check_outputs_outside_inputs, recover_dir
from quantvggt.images import IMAGE_EXTENSIONS, ImageLoadError, reference_first
from quantvggt.options import ReconstructionOptions
from quantvggt.predict import align_options, chunk_plan, frame_limits, predict_frames, scan_scene
from quantvggt.prediction import SceneError, ScenePrediction
from quantvggt.scene import SceneResult, collision_error, scene_label, scene_name, scene_source_key
from quantvggt.storage import COMPLETE, fetch_scene, local_path, open_storage, sha256_file, split_uri
from quantvggt.verify import verify_model

log = logging.getLogger(__name__)

PREVIEW = "preview.png"  # the picture of a scene's reconstruction, beside its report.json
TEMP_PREFIX = "quantvggt-scene-"  # temporary downloads of remote scenes (scene_folder)
_TEMP_SCENE = re.compile(re.escape(tempfile.gettempdir().rstrip("/")) + "/" + TEMP_PREFIX + r"[^/\s]+/[^/\s:]+")


def worker_name() -> str:
    """``host:pid`` of this process, as scene results name their worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class SceneJob:
    """One scene to reconstruct: where it is, where its result goes (``OUT/<name>``) and how."""

    source: str  # scene folder or URI (s3://..., any storage backend)
    out: str  # output root: folder or URI
    name: str = ""  # output name; '' = scene_name(source)
    options: ReconstructionOptions = field(default_factory=ReconstructionOptions)
    force: bool = False  # replace a finished result of the same source (else it is skipped)
    checkpoint: str = ""  # the model the result is made with (recorded in the completion record)

    def __post_init__(self) -> None:
        self.name = self.name or scene_name(self.source)
        if self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name or "\0" in self.name:
            raise ValueError(f"output name {self.name!r} is not a single folder name")

    @property
    def output(self) -> str:
        """Where the result goes (path or URI)."""
        return open_storage(self.out).uri(self.name)


@dataclass
class ScenePlan:
    """A planned scene: what the predict, merge and commit steps need to know (names only: it travels)."""

    job: SceneJob
    names: list[str]  # readable image file names, in scene order (the first is the reference frame)
    plan: ChunkPlan | None  # None: one forward pass over every frame
    chunk_size: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable files and why
    memory: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)  # scan and plan
    started: float = field(default_factory=time.time)  # wall clock when planning began (for the scene's total)

    @property
    def n_chunks(self) -> int:
        """Forward passes this scene takes."""
        return 1 if self.plan is None else len(self.plan.chunks)

    def chunk_names(self, k: int) -> list[str]:
        """File names of chunk ``k``'s images, in the plan's chunk order."""
        return list(self.names) if self.plan is None else [self.names[i] for i in self.plan.chunks[k]]


# -- the scene's files ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def scene_folder(source: str, names: list[str] | None = None) -> Iterator[Path]:
    """A local folder holding the scene's images (``names`` only, if given): the folder itself, or a temporary
    download of a remote scene, removed afterwards."""
    local = local_path(source)
    if local is not None:
        yield local
        return
    src, scene = split_uri(source)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        dest = Path(tmp) / scene
        if names is None:
            fetch_scene(src, scene, dest)
        else:
            dest.mkdir(parents=True)
            for n in names:
                src.download(f"{scene}/{n}", dest / n)
        yield dest


def count_images(source: str) -> int:
    """Image files directly in the scene (by extension; unread): an upper bound on its readable images."""
    local = local_path(source)
    if local is not None:
        return sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in local.iterdir()) if local.is_dir() else 0
    src, scene = split_uri(source)
    prefix = scene.rstrip("/") + "/"
    keys = [k[len(prefix) :] for k in src.list(prefix)]
    return sum("/" not in k and Path(k).suffix.lower() in IMAGE_EXTENSIONS for k in keys)


# -- plan -------------------------------------------------------------------------------------------------------------
def check_output(job: SceneJob) -> SceneResult | None:
    """A skipped result when ``OUT/<name>`` holds this source's finished result (and not ``force``), else None.

    Raises before any work for an output over an input folder, a file where the output folder should be, and a
    finished result of another source under the same name (unless ``force``).
    """
    check_outputs_outside_inputs([job.output], [job.source])  # else force/commit would replace the scene's images
    out = open_storage(job.out)
    final = local_path(job.output)
    if final is not None:
        check_destination(final)  # a file where OUT or OUT/<name> should be: fail now, not after the model ran
        recover_dir(final)  # a run killed mid-swap leaves the previous result aside: put it back before looking
    record = out.completion_record(job.name)
    if record is None and final is not None and (final / "report.json").is_file():
        record = _legacy_record(final)  # written before completion records were local too
    if record is None and final is not None and final.is_dir() and any(final.iterdir()):
        raise ValueError(
            f"{final} exists and is not a quantvggt result (no {COMPLETE} or report.json): refusing to replace it; "
            "choose another --out, or move that folder away"
        )
    if record is None or job.force:
        return None
    if record.get("source") in (None, "", scene_source_key(job.source)):  # records without a source: older
        return SceneResult(
            job.name,
            "skipped",
            images=int(record.get("images", 0)),
            points=int(record.get("points", 0)),
            output=job.output,
            report=open_storage(job.out).uri(f"{job.name}/report.json"),
            source=job.source,
        )
    raise ValueError(collision_error(job.output, record["source"]) + ", or force to replace it")


def _legacy_record(final: Path) -> dict[str, Any]:
    report = json.loads((final / "report.json").read_text())
    points = report.get("points", {})
    return {"images": report.get("images", 0), "points": points.get("kept", 0) if isinstance(points, dict) else 0}


def plan_scene(model: torch.nn.Module, job: SceneJob, folder: Path) -> ScenePlan:
    """Scan ``folder`` (the scene's local copy) and plan its forward passes under the frame limits."""
    t0, started = time.perf_counter(), time.time()
    check_formats(job.options.formats)
    paths, skipped = scan_scene(folder)
    limit, chunk_size, memory = frame_limits(model, paths, job.options)
    t_scan = time.perf_counter() - t0
    plan = None
    if len(paths) > limit:
        log.info("%s: %d images over the %d-frame single pass; chunks of %d", job.name, len(paths), limit, chunk_size)
        plan = chunk_plan(paths, chunk_size, job.options)
    timings = {"scan": t_scan} if plan is None else {"scan": t_scan, "plan": time.perf_counter() - t0 - t_scan}
    return ScenePlan(job, [p.name for p in paths], plan, chunk_size, skipped, memory, timings, started)


# -- predict ----------------------------------------------------------------------------------------------------------
def predict_chunk(model: torch.nn.Module, plan: ScenePlan, k: int, folder: Path) -> ScenePrediction:
    """Chunk ``k`` of ``plan`` from ``folder``, frames in the plan's order (each chunk's reference frame non-blank)."""
    frames = [folder / n for n in plan.chunk_names(k)]
    if plan.plan is None:  # scan_scene already put a non-blank reference frame first
        return predict_frames(model, frames, plan.job.options, plan.job.name)
    order = [frames.index(p) for p in reference_first(frames)]
    pred = predict_frames(model, [frames[j] for j in order], plan.job.options, plan.job.name)
    return select_frames(pred, [order.index(j) for j in range(len(frames))])  # back to the plan's order


ChunkOutcome = tuple[dict[str, Any], "ScenePrediction | None"]  # (worker, attempt, error, seconds), prediction


def predict_chunks(model: torch.nn.Module, plan: ScenePlan, folder: Path) -> Iterator[ChunkOutcome]:
    """Every chunk predicted here, one at a time (lazily: the merge holds one chunk's maps at a time).

    A chunk of a chunked scene whose images cannot be read is an outcome with an error (the merge reports it); a
    one-pass scene's error is raised (the scene fails).
    """
    for k in range(plan.n_chunks):
        meta: dict[str, Any] = {"worker": "", "attempt": 1, "error": ""}
        t0 = time.perf_counter()
        try:
            pred = predict_chunk(model, plan, k, folder)
        except (ImageLoadError, OSError) as e:
            if plan.plan is None:
                raise
            meta["error"] = str(e)
            meta["reason"] = f"cannot read its images: {e}"  # what the merge reports for its frames
            pred = None
        meta["seconds"] = round(time.perf_counter() - t0, 4)
        yield meta, pred


# -- merge ------------------------------------------------------------------------------------------------------------
def merge(plan: ScenePlan, outcomes: Iterable[ChunkOutcome], model: torch.nn.Module | None = None) -> ScenePrediction:
    """One prediction of the whole scene from its chunks' outcomes (taken in plan order, one at a time)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {**plan.timings_s, "fetch": 0.0, "load": 0.0, "model": 0.0}
    if plan.plan is None:
        (meta, merged), *_ = list(outcomes)
        if merged is None:
            raise RuntimeError(f"{plan.job.name}: prediction failed: {meta.get('error')}")
        for key, v in merged.report.get("timings_s", {}).items():
            timings[key] = timings.get(key, 0.0) + v
        merged.report.update(chunking=None, images_unregistered=[])
    else:
        merger = ChunkMerger(plan.plan, plan.names, align_options(plan.job.options))
        timings["align"] = 0.0
        per_chunk: list[dict[str, Any]] = []
        for meta, pred in outcomes:
            entry = {"worker": meta.get("worker", ""), "attempt": meta.get("attempt", 1)}
            if meta.get("error") or pred is None:
                merger.fail(meta.get("reason") or f"prediction failed: {meta.get('error')}")
                per_chunk.append(entry)
                continue
            chunk_times = pred.report.get("timings_s", {})
            for key in ("fetch", "load", "model", "wait"):  # wait: behind another call's pass (OneForwardAtATime)
                timings[key] = timings.get(key, 0.0) + chunk_times.get(key, 0.0)
            t = time.perf_counter()
            merger.add(pred)
            timings["align"] += time.perf_counter() - t
            per_chunk.append({**entry, "timings_s": {key: round(v, 4) for key, v in chunk_times.items()}})
            del pred  # one chunk's maps in memory at a time
        t = time.perf_counter()
        merged = merger.result()
        timings["merge"] = time.perf_counter() - t
        for entry, extra in zip(merged.report["chunking"]["per_chunk"], per_chunk):
            entry.update(extra)
        merged.report.update(model_input_hw=[int(v) for v in merged.depth.shape[1:]], chunk_size=plan.chunk_size)
    if not timings["fetch"]:
        timings.pop("fetch")
    merged.scene = plan.job.name
    report = merged.report
    report.pop("timings_s", None)
    merged.report = {
        "scene": plan.job.name,
        "images_used": list(merged.names),
        "images_skipped": plan.skipped,
        **report,
        **({"memory": plan.memory} if plan.memory else {}),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        **model_report(model),
    }
    log.debug("%s merged in %.3f s", plan.job.name, time.perf_counter() - t0)
    return merged


def model_report(model: torch.nn.Module | None) -> dict[str, Any]:
    """What report.json says about the model: its source, quantization config and attention kind."""
    return {
        "model_source": str(getattr(model, "source", None)),
        "quantization": (getattr(model, "quant_meta", None) or {}).get("config"),
        "attention": getattr(getattr(getattr(model, "config", None), "aggregator", None), "attention", None),
    }


# -- export + commit --------------------------------------------------------------------------------------------------
def write_result(pred: ScenePrediction, folder: Path, options: ReconstructionOptions, sources: list[Path] | None,
                 shown_as: Path | str | None = None, colmap: ColmapResult | None = None) -> dict[str, Any]:  # fmt: skip
    """COLMAP model (exported here unless given), workspace and report.json of ``pred`` into ``folder``."""
    colmap = colmap if colmap is not None else to_colmap(pred, options)
    if colmap.report["points"]["kept"] == 0:
        raise SceneError(f"{pred.scene}: no 3D point is left: {_emptied_by(colmap.report, options)}")
    workspace = write_workspace(colmap, folder, options, sources)
    kept = colmap.report["points"]["kept"]
    verify_model(folder / "sparse/0", len(pred.names), kept, shown_as=Path(shown_as or folder) / "sparse/0")
    report = {**pred.report, **colmap.report, "workspace": workspace}
    report["options"] = asdict(options)
    report["images"] = len(pred.names)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _emptied_by(report: dict[str, Any], options: ReconstructionOptions) -> str:
    """Which option left a model without points, in words a user can act on."""
    conf = report["points"].get("confidence", {})
    if conf.get("above_threshold", 1) == 0:
        which = f"conf_threshold {options.conf_threshold}" if options.conf_threshold is not None else (
            f"conf_percentile {options.conf_percentile}")  # fmt: skip
        return f"{which} is above every confidence (max {conf.get('max', float('nan')):.3g}); lower it"
    tracks = report.get("tracks", {})
    if tracks.get("enabled") and tracks.get("seeds", 0) and tracks.get("dropped_short", 0):
        return (
            f"min_track_length {options.min_track_length} drops every track of the {conf.get('above_threshold', '?')} "
            "pixels above the confidence threshold; lower it (COLMAP needs 2), or the confidence threshold"
        )
    return "no pixel had a finite depth and confidence"


def write_preview(result_folder: Path) -> Path | None:
    """``preview.png`` beside ``report.json``; a picture that cannot be drawn is logged and never fails the scene."""
    from quantvggt.preview import render_preview

    try:
        return render_preview(result_folder, result_folder / PREVIEW)
    except Exception as e:
        log.warning("no preview for %s: %s: %s", result_folder.name, type(e).__name__, e)
        return None


def export_and_commit(plan: ScenePlan, merged: ScenePrediction, folder: Path | None) -> SceneResult:
    """Write ``OUT/<name>`` (model, workspace, report.json, preview.png) and its completion record, last.

    ``folder`` holds the scene's images for images/ (None: none known). A local output is built beside its final
    place and renamed in whole; a remote one is built in a temporary folder and uploaded, the record after every file.
    """
    job, opts = plan.job, plan.job.options
    final = local_path(job.output)
    sources = [folder / n for n in merged.names] if folder is not None else None
    if opts.images == "link" and (final is None or local_path(job.source) is None):
        opts = replace(opts, images="copy")  # a link into a temporary download, or from another machine, would dangle
    extra = {"source": scene_source_key(job.source), "checkpoint": job.checkpoint, "options": asdict(job.options)}

    def build(tmp: Path, shown_as: Path | str) -> dict[str, Any]:
        merged.report.setdefault("timings_s", {})["total"] = round(time.time() - plan.started, 4)
        report = write_result(merged, tmp, opts, sources, shown_as)
        write_preview(tmp)
        return report

    if final is not None:
        with atomic_dir(final) as tmp:
            report = build(tmp, final)
            record = _record(tmp, report, extra)
            (tmp / COMPLETE).write_text(json.dumps(record, indent=1))
    else:
        out = open_storage(job.out)
        with tempfile.TemporaryDirectory(prefix="quantvggt-out-") as t:
            tmp = Path(t) / job.name
            tmp.mkdir()
            report = build(tmp, job.output)
            if job.force:
                out.delete_prefix(job.name + "/")
            out.upload_dir(tmp, job.name, extra=_record(None, report, extra))
    return SceneResult(
        job.name,
        "done",
        images=len(merged.names),
        points=int(report["points"]["kept"]),
        seconds=round(time.time() - plan.started, 3),
        output=job.output,
        report=open_storage(job.out).uri(f"{job.name}/report.json"),
        source=job.source,
    )


def _record(folder: Path | None, report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"images": report["images"], "points": report["points"]["kept"], **extra}
    if folder is not None:  # uploads list their files themselves (Storage.upload_dir)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        record = {"files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files},
                  "completed_at": time.time(), **record}  # fmt: skip
    return record


# -- all of it --------------------------------------------------------------------------------------------------------
def reconstruct(model: torch.nn.Module, job: SceneJob) -> SceneResult:
    """Plan, predict, merge, export and commit one scene in this process; raises for a scene that cannot be done."""
    skipped = check_output(job)
    if skipped is not None:
        return skipped
    t0 = time.perf_counter()
    with scene_folder(job.source) as folder:
        fetched = time.perf_counter() - t0  # a remote scene's whole download; ~0 for a local folder
        plan = plan_scene(model, job, folder)
        plan.timings_s["download"] = fetched
        merged = merge(plan, predict_chunks(model, plan, folder), model)
        return export_and_commit(plan, merged, folder)


def process_scene(model: torch.nn.Module, job: SceneJob, attempt: int = 1, worker: str | None = None) -> SceneResult:
    """:func:`reconstruct`, but never raising for a bad scene: the failure comes back as a failed result."""
    return guarded(lambda: reconstruct(model, job), job.source, job.name, attempt, worker)


def guarded(
    fn: Callable[[], SceneResult | Any], source: str, name: str = "", attempt: int = 1, worker: str | None = None
) -> Any:
    """``fn()`` with ``worker``/``attempt`` set on its result; any exception becomes a failed :class:`SceneResult`
    naming the scene as the user gave it (one bad scene never stops the batch)."""
    t0 = time.perf_counter()
    worker = worker or worker_name()
    try:
        result = fn()
    except Exception as e:
        log.warning("scene %s failed: %s", source, e)
        # a remote scene is read from a temporary download: name it as the user gave it
        error = _TEMP_SCENE.sub(source.rstrip("/"), f"{type(e).__name__}: {e}")
        return SceneResult(name or scene_label(source), error=error, attempt=attempt, worker=worker, source=source,
                           seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
    if isinstance(result, SceneResult):
        result.worker, result.attempt = worker, attempt
        if result.status == "skipped":
            result.seconds = round(time.perf_counter() - t0, 3)
    return result


def reconstruct_scene(
    model: torch.nn.Module, scene: str | Path, options: ReconstructionOptions | None = None
) -> ScenePrediction:
    """The model's prediction of a local scene folder, every readable image used (whole, or chunks merged)."""
    job = SceneJob(str(scene), out="", name=scene_name(scene), options=options or ReconstructionOptions())
    plan = plan_scene(model, job, Path(scene))
    return merge(plan, predict_chunks(model, plan, Path(scene)), model)


def write_scene(
    pred: ScenePrediction,
    colmap: ColmapResult,
    out_root: str | Path,
    options: ReconstructionOptions | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write the workspace ``OUT/<scene>`` and ``report.json`` of an exported prediction, renamed into place whole."""
    options = options or ReconstructionOptions()
    final = Path(out_root) / pred.scene
    sources = [Path(source) / name for name in pred.names] if source is not None else None
    with atomic_dir(final) as tmp:
        write_result(pred, tmp, options, sources, final, colmap)
    return final


def main(
    model: torch.nn.Module,
    scene: str | Path,
    out: str | Path,
    options: ReconstructionOptions | None = None,
    overwrite: bool = True,
    name: str | None = None,
) -> SceneResult:
    """Reconstruct one scene and write its COLMAP model to ``OUT/<name>``; raises for a scene that cannot be.

    With ``overwrite=False`` a finished result of the same scene is kept and reported as ``skipped``.
    """
    job = SceneJob(str(scene), str(out), name or "", options or ReconstructionOptions(), force=overwrite)
    return reconstruct(model, job)

"""Scene folders in, COLMAP sparse models out: ``reconstruct_scene`` -> ``to_colmap`` -> ``write_scene``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

# the export lives in quantvggt.colmap; its names stay importable from here for callers of this module
from quantvggt.colmap import (  # noqa: F401  (re-exported: callers import these from reconstruct)
    CAMERA_MODES,
    IMAGE_MODES,
    ColmapResult,
    ExportOptions,
    colmap_cameras,
    select_points,
    to_colmap,
    write_workspace,
)
from quantvggt.fsutil import atomic_dir, check_destination, check_outputs_outside_inputs, recover_dir
from quantvggt.geometry import pose_encoding_to_extri_intri
from quantvggt.images import (
    ImageLoadError,
    load_and_preprocess,
    readable_images,
    reference_first,
)
from quantvggt.prediction import SceneError, ScenePrediction
from quantvggt.scene import SceneResult, output_names, scene_name, scene_source_key
from quantvggt.verify import verify_model

log = logging.getLogger(__name__)


@dataclass
class ReconstructionOptions(ExportOptions):
    """How a scene is read, predicted and exported (the export fields come from :class:`ExportOptions`)."""

    max_frames: int = 32  # single-pass limit: a scene with more frames is predicted in overlapping chunks
    chunking: str = "sequential"  # "sequential" windows (ordered captures) or shared "anchors" (unordered)
    chunk_size: int | None = None  # frames per chunk; None = max_frames (or what memory_budget_mb allows)
    overlap: int | None = None  # sequential: frames shared by neighbouring chunks; None = chunk_size // 4
    anchors: int | None = None  # anchors: frames in every chunk; None = chunk_size // 4
    anchor_select: str = "even"  # anchors evenly spaced along the order, or by "features" (farthest-point, thumbnails)
    order: str = "auto"  # chunk along "name" order, a "similarity" chain (unordered sets), or "auto" (picks one)
    memory_budget_mb: float | None = None  # memory one forward pass may use beyond the weights; lowers the limits
    # a chunk whose alignment residual (relative to the scene extent) is higher fails; up to 2x it still merges when
    # the shared frames' poses agree within 12 degrees (chunking.AlignOptions)
    max_align_residual: float = 0.3
    mode: str = "crop"
    image_size: int | None = None  # preprocessing width; None = the model's own (518 for VGGT-1B)

    def __post_init__(self) -> None:
        # NaN passes every range check written with < and >, inf most of them (`--conf-threshold nan` wrote a model
        # with 0 points); so numbers must be finite first, and counts whole numbers, before any work is done
        for key in ("conf_percentile", "conf_threshold", "shared_camera_tol", "track_tolerance", "memory_budget_mb"):
            value = getattr(self, key, None)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number, got {value}")
        for key in ("max_points", "max_frames", "chunk_size", "overlap", "anchors", "image_size"):
            value = getattr(self, key, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{key} must be a whole number, got {value!r}")
        super().__post_init__()
        if self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        if not 0 < self.max_align_residual < math.inf:
            raise ValueError(f"max_align_residual must be a finite number > 0, got {self.max_align_residual}")
        if self.image_size is not None and (self.image_size < 14 or self.image_size % 14):
            raise ValueError(f"image_size must be a positive multiple of 14 (the patch size), got {self.image_size}")
        if self.max_frames < 2:
            raise ValueError(f"max_frames must be >= 2, got {self.max_frames}")
        if self.chunking not in ("sequential", "anchors"):
            raise ValueError(f"chunking must be 'sequential' or 'anchors', got {self.chunking!r}")
        if self.chunk_size is not None and self.chunk_size < 2:
            raise ValueError(f"chunk_size must be >= 2, got {self.chunk_size}")
        if self.overlap is not None and self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if self.anchors is not None and self.anchors < 1:
            raise ValueError(f"anchors must be >= 1, got {self.anchors}")
        if self.anchor_select not in ("even", "features"):
            raise ValueError(f"anchor_select must be 'even' or 'features', got {self.anchor_select!r}")
        if self.order not in ("auto", "name", "similarity"):
            raise ValueError(f"order must be 'auto', 'name' or 'similarity', got {self.order!r}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"mode must be 'crop' or 'pad', got {self.mode!r}")


def scan_scene(scene: str | Path) -> tuple[list[Path], list[dict]]:
    """Every readable image (the first non-blank one first) and the skipped files with reasons."""
    scene = Path(scene)
    if not scene.is_dir():
        raise SceneError(f"{scene}: not a folder")
    good, skipped = readable_images(scene)
    if len(good) < 2:
        raise SceneError(
            f"{scene}: needs at least 2 usable images, found {len(good)}"
            + (f" ({len(skipped)} unreadable)" if skipped else "")
        )
    try:
        paths = reference_first(good)  # VGGT's world frame is frame 0: never a blank one
    except ImageLoadError as e:
        raise SceneError(f"{scene}: {e}") from e
    return paths, skipped


def predict_frames(
    model: torch.nn.Module, paths: list[Path], options: ReconstructionOptions, scene: str = ""
) -> ScenePrediction:
    """One forward pass over ``paths`` (the first is the reference frame); ``report`` holds its timings."""
    t0 = time.perf_counter()
    size = options.image_size or model.image_size
    batch = load_and_preprocess(paths, mode=options.mode, target_size=size)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    device = model.aggregator.camera_token.device
    with torch.no_grad():
        preds = model(batch.images.to(device))
    t2 = time.perf_counter()
    H, W = batch.images.shape[-2:]
    extr, K = pose_encoding_to_extri_intri(preds["pose_enc"][0].double().cpu(), (H, W))
    np_ = lambda t: None if t is None else t[0].detach().float().cpu().numpy()
    return ScenePrediction(
        scene=scene,
        names=[p.name for p in paths],
        original_sizes=batch.original_sizes,
        transforms=batch.transforms,
        extrinsics=extr.numpy(),
        intrinsics=K.numpy(),
        depth=np_(preds["depth"])[..., 0],
        depth_conf=np_(preds["depth_conf"]),
        world_points=np_(preds.get("world_points")),
        world_points_conf=np_(preds.get("world_points_conf")),
        images=batch.images.permute(0, 2, 3, 1).numpy(),
        report={"model_input_hw": [int(H), int(W)], "timings_s": {"load": t1 - t0, "model": t2 - t1}},
    )


def frame_limits(model: torch.nn.Module, paths: list[Path], options: ReconstructionOptions) -> tuple[int, int, dict]:
    """(single-pass limit, chunk size, memory report): ``max_frames`` / ``chunk_size``, lowered to fit the budget."""
    limit = options.max_frames
    chunk = options.chunk_size or limit
    info: dict[str, Any] = {}
    if options.memory_budget_mb is not None:
        from quantvggt.chunking import forward_bytes, frames_for_budget
        from quantvggt.images import open_image, preprocess_image

        size = options.image_size or model.image_size
        img, _ = preprocess_image(open_image(paths[0], name=paths[0].name), options.mode, size)  # type: ignore[arg-type]
        H, W = img.shape[-2:]
        fit = frames_for_budget(model, H, W, options.memory_budget_mb * 2**20)
        limit, chunk = min(limit, fit), min(chunk, fit)
        info = {
            "budget_mb": options.memory_budget_mb,
            "frames_in_budget": fit,
            "estimated_mb": round(forward_bytes(model, min(len(paths), limit), H, W) / 2**20, 1),
        }
    return limit, max(2, chunk), info


def chunk_plan(paths: list[Path], chunk_size: int, options: ReconstructionOptions) -> Any:
    """The scene's chunks as ``options`` ask (design, overlap/anchors, order); a :class:`chunking.ChunkPlan`."""
    from quantvggt.chunking import plan_scene

    return plan_scene(
        len(paths),
        chunk_size,
        options.chunking,
        options.overlap,
        options.anchors,
        options.anchor_select,
        paths,
        options.order,
    )


def align_options(options: ReconstructionOptions) -> Any:
    """How chunks are aligned and gated, from ``options`` (a :class:`chunking.AlignOptions`)."""
    from quantvggt.chunking import AlignOptions

    return AlignOptions(points_from=options.points_from, max_residual=options.max_align_residual, seed=options.seed)


def predict_chunked(
    model: torch.nn.Module, paths: list[Path], chunk_size: int, options: ReconstructionOptions, scene: str = ""
) -> ScenePrediction:
    """Overlapping chunks predicted one at a time, aligned by Sim(3) and merged (see :mod:`quantvggt.chunking`)."""
    from quantvggt.chunking import ChunkMerger, select_frames

    t0 = time.perf_counter()
    names = [p.name for p in paths]
    plan = chunk_plan(paths, chunk_size, options)
    merger = ChunkMerger(plan, names, align_options(options))
    timings = {"plan": time.perf_counter() - t0, "load": 0.0, "model": 0.0, "align": 0.0}
    per_chunk = []
    for chunk in plan.chunks:
        frames = [paths[i] for i in chunk]
        try:
            order = [frames.index(p) for p in reference_first(frames)]  # a non-blank reference frame per chunk
            pred = predict_frames(model, [frames[j] for j in order], options, scene)
        except (ImageLoadError, OSError) as e:
            merger.fail(f"cannot read its images: {e}")
            per_chunk.append({})
            continue
        pred = select_frames(pred, [order.index(j) for j in range(len(chunk))])  # back to the plan's order
        for key in ("load", "model"):
            timings[key] += pred.report["timings_s"][key]
        t = time.perf_counter()
        merger.add(pred)
        timings["align"] += time.perf_counter() - t
        per_chunk.append({key: round(v, 4) for key, v in pred.report["timings_s"].items()})
        del pred  # one chunk's maps in memory at a time
    t = time.perf_counter()
    merged = merger.result()
    timings["merge"] = time.perf_counter() - t
    for entry, times in zip(merged.report["chunking"]["per_chunk"], per_chunk):
        entry["timings_s"] = times
    merged.scene = scene
    merged.report.update(model_input_hw=[int(v) for v in merged.depth.shape[1:]], timings_s=timings)
    return merged


def reconstruct_scene(
    model: torch.nn.Module, scene: str | Path, options: ReconstructionOptions | None = None
) -> ScenePrediction:
    """Run the model over one scene folder (float or quantized model alike); every readable image is used.

    Up to the single-pass limit (``max_frames``, lowered by ``memory_budget_mb``) one forward pass sees every frame;
    above it the frames are predicted in overlapping chunks brought into one world (:func:`predict_chunked`).
    Images of a chunk that fails to align are listed in ``report["images_unregistered"]`` with the reason.
    """
    options = options or ReconstructionOptions()
    name = scene_name(scene)
    scene = Path(scene)
    t0 = time.perf_counter()
    paths, skipped = scan_scene(scene)
    limit, chunk_size, memory = frame_limits(model, paths, options)
    t_scan = time.perf_counter() - t0
    if len(paths) <= limit:
        pred = predict_frames(model, paths, options, name)
        pred.report.update(chunking=None, images_unregistered=[])
    else:
        log.info("%s: %d images over the %d-frame single pass; chunks of %d", name, len(paths), limit, chunk_size)
        pred = predict_chunked(model, paths, chunk_size, options, name)
    timings = {"scan": t_scan, **pred.report.pop("timings_s")}
    pred.report = {
        "scene": name,
        "images_used": list(pred.names),
        "images_skipped": skipped,
        **pred.report,
        **({"memory": memory} if memory else {}),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "model_source": str(getattr(model, "source", None)),
        "quantization": (getattr(model, "quant_meta", None) or {}).get("config"),
        "attention": getattr(getattr(getattr(model, "config", None), "aggregator", None), "attention", None),
    }
    return pred


def write_scene(
    pred: ScenePrediction,
    colmap: ColmapResult,
    out_root: str | Path,
    options: ReconstructionOptions | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write the workspace ``OUT/<scene>`` and ``report.json`` via a temporary folder renamed into place.

    ``source`` is the scene folder the images are linked or copied from (``options.images``) into ``images/``.
    """
    options = options or ReconstructionOptions()
    final = Path(out_root) / pred.scene
    sources = [Path(source) / name for name in pred.names] if source is not None else None
    with atomic_dir(final) as tmp:
        workspace = write_workspace(colmap, tmp, options, sources)
        verify_model(tmp / "sparse/0", len(pred.names), colmap.report["points"]["kept"], shown_as=final / "sparse/0")
        report = {**pred.report, **colmap.report, "workspace": workspace}
        report["options"] = asdict(options)
        report["images"] = len(pred.names)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return final


def _local_only(*paths: str | Path) -> None:
    """Refuse URIs: ``Path("s3://b/k")`` would be the local ``s3:/b/k``, reported as "not a folder" or created."""
    for p in paths:
        text = str(p)
        if "://" in text:
            raise ValueError(
                f"{text}: reconstruct reads and writes local folders only; for S3 use the reconstruct flow "
                "(`quantvggt submit`), or copy the scene to a local folder first"
            )


def _checked_name(name: str) -> str:
    """An output name must be one folder name: ``OUT/<name>`` is replaced as a whole."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"output name {name!r} is not a single folder name")
    return name


def main(
    model: torch.nn.Module,
    scene: str | Path,
    out: str | Path,
    options: ReconstructionOptions | None = None,
    overwrite: bool = True,
    name: str | None = None,
) -> SceneResult:
    """Reconstruct one scene folder and write its COLMAP model to ``OUT/<name>``; raises for a scene that cannot be.

    ``name`` defaults to :func:`scene_name` (callers with several scenes pass :func:`output_names`' choice). With
    ``overwrite=False`` an existing result is kept and reported as ``skipped``. Refused before any work: a scene
    or ``out`` that is a URI (this reads local folders), and an ``OUT/<name>`` overlapping the scene folder.
    """
    options = options or ReconstructionOptions()
    t0 = time.perf_counter()
    _local_only(scene, out)
    name = scene_name(scene) if name is None else _checked_name(name)
    final = Path(out) / name
    check_outputs_outside_inputs([final], [scene])
    check_destination(final)  # a file where OUT or OUT/<name> should be: fail now, not after the model ran
    recover_dir(final)  # a run killed mid-swap leaves the previous result aside: put it back before looking
    done = SceneResult(name, "done", output=str(final), report=str(final / "report.json"), source=str(scene))
    if not overwrite and (final / "report.json").is_file():
        old = json.loads((final / "report.json").read_text())
        return replace(done, status="skipped", images=old["images"], points=old["points"]["kept"])
    pred = reconstruct_scene(model, scene, options)
    colmap = to_colmap(pred, options)
    timings = {**pred.report["timings_s"], "total": round(time.perf_counter() - t0, 4)}
    pred = replace(pred, scene=name, report={**pred.report, "scene": name, "timings_s": timings})
    write_scene(pred, colmap, out, options, source=scene)
    return replace(
        done,
        images=len(pred.names),
        points=colmap.report["points"]["kept"],
        seconds=round(time.perf_counter() - t0, 3),
    )


# -- the `quantvggt reconstruct` command -----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt reconstruct``."""
    parser.add_argument("scenes", nargs="+", help="scene folders of images (local; S3 scenes go through the flow)")
    parser.add_argument("--out", required=True, help="output root: each scene is written to OUT/<scene folder name>")
    parser.add_argument(
        "--on-collision",
        choices=["error", "suffix"],
        default="error",
        help="scenes with the same folder name: refuse before any work (default), or name each <name>-<8 hex>",
    )
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--model", default="facebook/VGGT-1B", help="float model source")
    g.add_argument("--quantized", help="quantized checkpoint folder")
    parser.add_argument(
        "--attention",
        choices=["sdpa", "int8"],
        default=None,
        help="frame/global attention: exact sdpa or int8 Q·K^T (default: as the model or checkpoint records; sdpa)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (zero graph breaks; pays off over many scenes of a few frame counts)",
    )
    parser.add_argument(
        "--max-frames", type=int, default=32, help="single-pass limit; larger scenes go in chunks (no image dropped)"
    )
    chunks = parser.add_argument_group("large scenes (more frames than --max-frames)")
    chunks.add_argument(
        "--chunking",
        choices=["sequential", "anchors"],
        default="sequential",
        help="sequential overlapping windows (ordered captures) or anchor frames shared by every chunk (unordered)",
    )
    chunks.add_argument("--chunk-size", type=int, default=None, help="frames per chunk (default: --max-frames)")
    chunks.add_argument("--overlap", type=int, default=None, help="sequential: shared frames (default: chunk/4)")
    chunks.add_argument("--anchors", type=int, default=None, help="anchors: frames in every chunk (default: chunk/4)")
    chunks.add_argument("--anchor-select", choices=["even", "features"], default="even")
    chunks.add_argument(
        "--order",
        choices=["auto", "name", "similarity"],
        default="auto",
        help="chunk along file-name order, a chain of similar-looking frames (unordered collections), or auto: "
        "name order unless it jumps between unlike views",
    )
    chunks.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="memory one forward pass may use beyond the weights; lowers the single-pass limit and chunk size",
    )
    chunks.add_argument(
        "--max-align-residual",
        type=float,
        default=0.3,
        help="a chunk aligning worse than this (relative to the scene extent) is reported, not merged "
        "(up to 2x this when the shared frames' poses agree within 12 degrees)",
    )
    parser.add_argument("--conf-percentile", type=float, default=50.0)
    parser.add_argument(
        "--conf-threshold", type=float, default=None, help="absolute confidence threshold (overrides the percentile)"
    )
    parser.add_argument("--max-points", type=int, default=100_000)
    parser.add_argument("--points-from", choices=["depth", "point_map"], default="depth")
    parser.add_argument("--mode", choices=["crop", "pad"], default="crop")
    parser.add_argument("--text", action="store_true", help="also write COLMAP text files")
    export = parser.add_argument_group("COLMAP export")
    export.add_argument(
        "--no-tracks", dest="tracks", action="store_false", help="one observation per point (no multi-view tracks)"
    )
    export.add_argument(
        "--track-tolerance",
        type=float,
        default=ExportOptions.track_tolerance,
        help="relative depth difference under which another frame observes a point",
    )
    export.add_argument(
        "--min-track-length",
        type=int,
        default=ExportOptions.min_track_length,
        help="drop points seen by fewer frames (COLMAP's bundle_adjuster needs 2)",
    )
    export.add_argument("--ba", action="store_true", help="bundle-adjust poses, focal lengths and points (pycolmap)")
    export.add_argument(
        "--camera",
        choices=CAMERA_MODES,
        default=ExportOptions.camera,
        help="COLMAP cameras: per image size and focal cluster (auto), one per image size (single), or per image",
    )
    export.add_argument(
        "--camera-tol",
        dest="shared_camera_tol",
        type=float,
        default=ExportOptions.shared_camera_tol,
        help="auto: a relative focal-length gap that starts a new camera",
    )
    export.add_argument(
        "--images",
        choices=IMAGE_MODES,
        default=ExportOptions.images,
        help="OUT/<scene>/images for COLMAP MVS and Gaussian splatting: absolute symlinks, copies, or none",
    )
    export.add_argument("--no-ply", dest="ply", action="store_false", help="no sparse/0/points3D.ply")
    export.add_argument("--no-database", dest="database", action="store_false", help="no database.db")


def run(args: argparse.Namespace) -> int:
    """Reconstruct scene folders and write COLMAP models; one bad scene does not stop the others (exit 1)."""
    from tqdm import tqdm

    from quantvggt.model.aggregator import set_attention
    from quantvggt.pipeline import load_model

    opts = ReconstructionOptions(
        max_frames=args.max_frames,
        chunking=args.chunking,
        chunk_size=args.chunk_size,
        overlap=args.overlap,
        anchors=args.anchors,
        anchor_select=args.anchor_select,
        order=args.order,
        memory_budget_mb=args.memory_budget_mb,
        max_align_residual=args.max_align_residual,
        conf_percentile=args.conf_percentile,
        conf_threshold=args.conf_threshold,
        max_points=args.max_points,
        text=args.text,
        points_from=args.points_from,
        mode=args.mode,
        tracks=args.tracks,
        track_tolerance=args.track_tolerance,
        min_track_length=args.min_track_length,
        ba=args.ba,
        camera=args.camera,
        shared_camera_tol=args.shared_camera_tol,
        images=args.images,
        ply=args.ply,
        database=args.database,
    )
    # refused before the model is loaded: URIs, two scenes writing one OUT/<name>, an output over an input folder
    _local_only(*args.scenes, args.out)
    scenes = list({scene_source_key(s): s for s in args.scenes}.values())  # a folder given twice is done once
    names = output_names(scenes, args.on_collision)
    check_outputs_outside_inputs([Path(args.out) / names[s] for s in scenes], scenes)
    model = set_attention(load_model(args.quantized or args.model), args.attention)
    if args.compile:  # after set_attention, so the compiled graph traces the attention actually used
        model = model.compile_()
    failed = 0
    for scene in tqdm(scenes, desc="scenes", unit="scene"):
        try:
            res = main(model, scene, args.out, opts, name=names[scene])
            tqdm.write(f"{res.scene}: {res.images} images, {res.points} points -> {Path(res.output) / 'sparse' / '0'}")
        except (ValueError, RuntimeError, OSError) as e:  # SceneError is a ValueError; OutputError an OSError
            failed += 1
            tqdm.write(f"{names[scene]}: FAILED: {e}")
    print(f"{len(scenes) - failed} of {len(scenes)} scenes reconstructed into {args.out}")
    return 1 if failed else 0

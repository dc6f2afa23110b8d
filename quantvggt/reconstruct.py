"""Scene folders in, COLMAP sparse models out: ``reconstruct_scene`` -> ``to_colmap`` -> ``write_scene``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantvggt.fsutil import atomic_dir
from quantvggt.geometry import pose_encoding_to_extri_intri, unproject_depth
from quantvggt.images import (
    ImageLoadError,
    ImageTransform,
    load_and_preprocess,
    pick_frames,
    readable_images,
    reference_first,
)
from quantvggt.scene import SceneResult, scene_name

log = logging.getLogger(__name__)


class SceneError(ValueError):
    """A scene cannot be reconstructed (e.g. fewer than 2 usable images)."""


@dataclass
class ReconstructionOptions:
    """How a scene is read, predicted and exported."""

    max_frames: int = 32
    mode: str = "crop"
    image_size: int | None = None  # preprocessing width; None = the model's own (518 for VGGT-1B)
    points_from: str = "depth"  # "depth" (unproject with predicted cameras) or "point_map"
    conf_percentile: float = 50.0  # keep points above this confidence percentile ...
    conf_threshold: float | None = None  # ... or above this absolute confidence, when set
    max_points: int = 100_000
    seed: int = 0
    shared_camera_tol: float = 0.02  # relative tolerance for merging equal intrinsics into one camera
    text: bool = False

    def __post_init__(self) -> None:
        if self.max_frames < 2:
            raise ValueError(f"max_frames must be >= 2, got {self.max_frames}")
        if self.points_from not in ("depth", "point_map"):
            raise ValueError(f"points_from must be 'depth' or 'point_map', got {self.points_from!r}")
        if not 0 <= self.conf_percentile < 100:
            raise ValueError(f"conf_percentile must be in [0, 100), got {self.conf_percentile}")
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"mode must be 'crop' or 'pad', got {self.mode!r}")


@dataclass
class ScenePrediction:
    """Model outputs for one scene, in numpy, with the maps back to the original images."""

    scene: str
    names: list[str]
    original_sizes: list[tuple[int, int]]
    transforms: list[ImageTransform]
    extrinsics: np.ndarray  # [S, 3, 4] camera-from-world
    intrinsics: np.ndarray  # [S, 3, 3] in model pixels
    depth: np.ndarray  # [S, H, W]
    depth_conf: np.ndarray  # [S, H, W]
    world_points: np.ndarray | None  # [S, H, W, 3]
    world_points_conf: np.ndarray | None
    images: np.ndarray  # [S, H, W, 3] float in [0, 1]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class ColmapResult:
    """What :func:`to_colmap` built from a prediction, which it leaves untouched."""

    reconstruction: Any  # pycolmap.Reconstruction
    intrinsics: np.ndarray  # [S, 3, 3] model-pixel intrinsics of the cameras as written (shared cameras averaged)
    report: dict[str, Any]  # "points" (kept, source, confidence statistics) and "cameras" for report.json


def scan_scene(scene: str | Path, max_frames: int) -> tuple[list[Path], list[dict], list[str]]:
    """Readable images (subsampled to ``max_frames``), skipped files with reasons, and names dropped by subsampling."""
    scene = Path(scene)
    if not scene.is_dir():
        raise SceneError(f"{scene}: not a folder")
    good, skipped = readable_images(scene)
    if len(good) < 2:
        raise SceneError(
            f"{scene}: needs at least 2 usable images, found {len(good)}"
            + (f" ({len(skipped)} unreadable)" if skipped else "")
        )
    keep = pick_frames(len(good), max_frames)
    dropped = [good[i].name for i in range(len(good)) if i not in set(keep)]
    if dropped:
        log.info(
            "%s: %d images over the %d-frame cap; dropped %d evenly", scene.name, len(good), max_frames, len(dropped)
        )
    try:
        paths = reference_first([good[i] for i in keep])  # VGGT's world frame is frame 0: never a blank one
    except ImageLoadError as e:
        raise SceneError(f"{scene}: {e}") from e
    return paths, skipped, dropped


def reconstruct_scene(
    model: torch.nn.Module, scene: str | Path, options: ReconstructionOptions | None = None
) -> ScenePrediction:
    """Run the model over one scene folder (float or quantized model alike)."""
    options = options or ReconstructionOptions()
    name = scene_name(scene)
    scene = Path(scene)
    t0 = time.perf_counter()
    paths, skipped, dropped = scan_scene(scene, options.max_frames)
    size = options.image_size or model.image_size
    batch = load_and_preprocess(paths, mode=options.mode, target_size=size)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    device = model.aggregator.camera_token.device
    with torch.no_grad():
        preds = model(batch.images.to(device))
    t2 = time.perf_counter()
    H, W = batch.images.shape[-2:]
    extr, K = pose_encoding_to_extri_intri(preds["pose_enc"][0].double().cpu(), (H, W))
    np_ = lambda t: None if t is None else t[0].detach().float().cpu().numpy()  # noqa: E731
    report = {
        "scene": name,
        "images_used": [p.name for p in paths],
        "images_skipped": skipped,
        "images_dropped_by_frame_cap": dropped,
        "model_input_hw": [int(H), int(W)],
        "timings_s": {"load": round(t1 - t0, 4), "model": round(t2 - t1, 4)},
        "model_source": str(getattr(model, "source", None)),
        "quantization": (getattr(model, "quant_meta", None) or {}).get("config"),
    }
    return ScenePrediction(
        scene=name,
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
        report=report,
    )


def _valid_content_mask(tf: ImageTransform, size: tuple[int, int], H: int, W: int) -> np.ndarray:
    """Model pixels whose centres fall inside the original image (excludes padding)."""
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xy = tf.to_original(np.stack([u, v], -1))
    return (xy[..., 0] >= 0) & (xy[..., 0] < size[0]) & (xy[..., 1] >= 0) & (xy[..., 1] < size[1])


def select_points(
    pred: ScenePrediction, options: ReconstructionOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Choose 3D points: -> (frame index, flat pixel index, xyz) per point, plus confidence statistics."""
    S, H, W = pred.depth.shape
    if options.points_from == "point_map":
        if pred.world_points is None:
            raise SceneError(f"{pred.scene}: the model has no point head; use points_from='depth'")
        xyz, conf = pred.world_points, pred.world_points_conf
    else:
        xyz = unproject_depth(
            torch.from_numpy(pred.depth).double(),
            torch.from_numpy(pred.extrinsics),
            torch.from_numpy(pred.intrinsics),
            pixel_offset=0.5,
        ).numpy()
        conf = pred.depth_conf
    valid = np.stack([_valid_content_mask(tf, sz, H, W) for tf, sz in zip(pred.transforms, pred.original_sizes)])
    valid &= np.isfinite(xyz).all(-1) & np.isfinite(conf)
    if options.points_from == "depth":
        valid &= pred.depth > 0
    vals = conf[valid]
    threshold = (
        options.conf_threshold
        if options.conf_threshold is not None
        else (float(np.percentile(vals, options.conf_percentile)) if vals.size else np.inf)
    )
    keep = valid & (conf >= threshold)
    f, flat = np.nonzero(keep.reshape(S, -1))
    if f.size > options.max_points:
        sel = np.sort(np.random.default_rng(options.seed).choice(f.size, options.max_points, replace=False))
        f, flat = f[sel], flat[sel]
    stats = {
        "threshold": float(threshold),
        "min": float(vals.min()) if vals.size else None,
        "median": float(np.median(vals)) if vals.size else None,
        "max": float(vals.max()) if vals.size else None,
        "candidates": int(valid.sum()),
        "above_threshold": int(keep.sum()),
    }
    return f, flat, xyz.reshape(S, -1, 3)[f, flat], stats


def colmap_cameras(pred: ScenePrediction, tol: float) -> list[int]:
    """Camera index per image: images share a camera when size and original-pixel intrinsics agree within ``tol``."""
    params, assign = [], []
    for i, (tf, size) in enumerate(zip(pred.transforms, pred.original_sizes)):
        K = tf.intrinsics_to_original(pred.intrinsics[i])
        p = (size, np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2]]))
        for j, (sz, q) in enumerate(params):
            if sz == size and np.all(np.abs(q - p[1]) <= tol * np.abs(q).clip(min=1.0)):
                assign.append(j)
                break
        else:
            params.append(p)
            assign.append(len(params) - 1)
    return assign


def to_colmap(pred: ScenePrediction, options: ReconstructionOptions | None = None) -> ColmapResult:
    """Build a ``pycolmap.Reconstruction`` (PINHOLE cameras at original resolution, posed images, observed points).

    ``pred`` is not modified: the adjusted intrinsics and the points/cameras report come back in the result.
    """
    import pycolmap

    options = options or ReconstructionOptions()
    S, _H, W = pred.depth.shape
    bad = [
        pred.names[i]
        for i in range(S)
        if not (
            np.isfinite(pred.intrinsics[i]).all()
            and np.isfinite(pred.extrinsics[i]).all()
            and pred.intrinsics[i][0, 0] > 0
            and pred.intrinsics[i][1, 1] > 0
        )
    ]
    if bad:
        raise SceneError(
            f"{pred.scene}: the model predicted invalid cameras (non-finite pose or focal length) for {', '.join(bad)}"
        )
    cam_of = colmap_cameras(pred, options.shared_camera_tol)
    rec = pycolmap.Reconstruction()
    intrinsics = pred.intrinsics.copy()
    for c in sorted(set(cam_of)):
        members = [i for i in range(S) if cam_of[i] == c]
        Ks = np.stack([pred.transforms[i].intrinsics_to_original(pred.intrinsics[i]) for i in members])
        K = Ks.mean(0)
        for i in members:  # unproject with the camera actually written, so observations re-project exactly
            intrinsics[i] = pred.transforms[i].intrinsics_to_model(K)
        w, h = pred.original_sizes[members[0]]
        rec.add_camera_with_trivial_rig(
            pycolmap.Camera(
                model="PINHOLE",
                width=int(w),
                height=int(h),
                params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
                camera_id=c + 1,
            )
        )
    f_idx, flat, xyz, conf_stats = select_points(replace(pred, intrinsics=intrinsics), options)
    u = flat % W + 0.5
    v = flat // W + 0.5
    for i in range(S):
        mine = np.flatnonzero(f_idx == i)
        uv = np.stack([u[mine], v[mine]], -1) if mine.size else np.zeros((0, 2))
        keypoints = pred.transforms[i].to_original(uv) if mine.size else uv
        img = pycolmap.Image(
            name=pred.names[i], keypoints=keypoints.astype(np.float64), camera_id=cam_of[i] + 1, image_id=i + 1
        )
        rec.add_image_with_trivial_frame(img)
        rec.frame(i + 1).rig_from_world = pycolmap.Rigid3d(pred.extrinsics[i].astype(np.float64))
        rec.register_frame(i + 1)
        colors = (pred.images[i].reshape(-1, 3)[flat[mine]] * 255 + 0.5).clip(0, 255).astype(np.uint8)
        for k, j in enumerate(mine):
            track = pycolmap.Track([pycolmap.TrackElement(i + 1, k)])
            rec.add_point3D(xyz[j].astype(np.float64), track, colors[k])
    rec.update_point_3d_errors()
    report = {
        "points": {"kept": int(rec.num_points3D()), "source": options.points_from, "confidence": conf_stats},
        "cameras": int(rec.num_cameras()),
    }
    return ColmapResult(rec, intrinsics, report)


def write_scene(
    pred: ScenePrediction, colmap: ColmapResult, out_root: str | Path, options: ReconstructionOptions | None = None
) -> Path:
    """Write ``OUT/<scene>/sparse/0`` and ``report.json`` via a temporary folder renamed into place."""
    options = options or ReconstructionOptions()
    final = Path(out_root) / pred.scene
    with atomic_dir(final) as tmp:
        sparse = tmp / "sparse" / "0"
        sparse.mkdir(parents=True)
        colmap.reconstruction.write(str(sparse))
        if options.text:
            colmap.reconstruction.write_text(str(sparse))
        report = {**pred.report, **colmap.report}
        report["options"] = asdict(options)
        report["images"] = len(pred.names)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return final


def main(
    model: torch.nn.Module,
    scene: str | Path,
    out: str | Path,
    options: ReconstructionOptions | None = None,
    overwrite: bool = True,
) -> SceneResult:
    """Reconstruct one scene folder and write its COLMAP model to ``OUT/<scene>``; raises for a scene that cannot be.

    With ``overwrite=False`` an existing result is kept and reported as ``skipped``.
    """
    options = options or ReconstructionOptions()
    t0 = time.perf_counter()
    name = scene_name(scene)
    final = Path(out) / name
    done = SceneResult(name, "done", output=str(final), report=str(final / "report.json"), source=str(scene))
    if not overwrite and (final / "report.json").is_file():
        old = json.loads((final / "report.json").read_text())
        return replace(done, status="skipped", images=old["images"], points=old["points"]["kept"])
    pred = reconstruct_scene(model, scene, options)
    colmap = to_colmap(pred, options)
    timings = {**pred.report["timings_s"], "total": round(time.perf_counter() - t0, 4)}
    write_scene(replace(pred, report={**pred.report, "timings_s": timings}), colmap, out, options)
    return replace(
        done,
        images=len(pred.names),
        points=colmap.report["points"]["kept"],
        seconds=round(time.perf_counter() - t0, 3),
    )


# -- the `quantvggt reconstruct` command -----------------------------------------------------------------------------
HELP = "reconstruct scene folders into COLMAP sparse models"


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt reconstruct``."""
    parser.add_argument("scenes", nargs="+", help="scene folders of images")
    parser.add_argument("--out", required=True)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--model", default="facebook/VGGT-1B", help="float model source")
    g.add_argument("--quantized", help="quantized checkpoint folder")
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--conf-percentile", type=float, default=50.0)
    parser.add_argument(
        "--conf-threshold", type=float, default=None, help="absolute confidence threshold (overrides the percentile)"
    )
    parser.add_argument("--max-points", type=int, default=100_000)
    parser.add_argument("--points-from", choices=["depth", "point_map"], default="depth")
    parser.add_argument("--mode", choices=["crop", "pad"], default="crop")
    parser.add_argument("--text", action="store_true", help="also write COLMAP text files")


def run(args: argparse.Namespace) -> int:
    """Reconstruct scene folders and write COLMAP models; one bad scene does not stop the others (exit 1)."""
    from tqdm import tqdm

    from quantvggt.pipeline import load_model

    opts = ReconstructionOptions(
        max_frames=args.max_frames,
        conf_percentile=args.conf_percentile,
        conf_threshold=args.conf_threshold,
        max_points=args.max_points,
        text=args.text,
        points_from=args.points_from,
        mode=args.mode,
    )
    model = load_model(args.quantized or args.model)
    failed = 0
    for scene in tqdm(args.scenes, desc="scenes", unit="scene"):
        try:
            res = main(model, scene, args.out, opts)
            tqdm.write(f"{res.scene}: {res.images} images, {res.points} points -> {Path(res.output) / 'sparse' / '0'}")
        except (ValueError, RuntimeError, OSError) as e:  # SceneError is a ValueError
            failed += 1
            tqdm.write(f"{_label(scene)}: FAILED: {e}")
    print(f"{len(args.scenes) - failed} of {len(args.scenes)} scenes reconstructed into {args.out}")
    return 1 if failed else 0


def _label(scene: str) -> str:
    try:
        return scene_name(scene)
    except ValueError:
        return repr(scene)

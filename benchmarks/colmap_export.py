"""COLMAP export: speed of the vectorised writer vs the old per-point builder, and tracks / BA on synthetic scenes.

    quantvggt synth runs/evalset --scenes 10 --frames 8 --seed 0
    python benchmarks/colmap_export.py --scenes runs/evalset [--speed-only | --quality-only]

Part 1 times building + writing a 100k-point model from one prediction of the shipped small model (run at 224 px so
a scene has enough pixels): the old builder (one ``pycolmap`` call chain per point, kept below verbatim as the
baseline) against :func:`quantvggt.colmap.to_colmap` + ``ColmapModel.write`` on the same points, in the same process.
Part 2 runs the shipped model on every synthetic scene and reports track lengths, reprojection error and pose AUC@30
and point accuracy against ground truth, for the feed-forward model and after ``--ba``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from quantvggt import colmap as cm
from quantvggt import eval as ev
from quantvggt.geometry import unproject_depth
from quantvggt.model import load_vggt
from quantvggt.reconstruct import ReconstructionOptions, reconstruct_scene
from quantvggt.synth import load_gt


def _old_valid_content_mask(tf, size, H, W):
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xy = tf.to_original(np.stack([u, v], -1))
    return (xy[..., 0] >= 0) & (xy[..., 0] < size[0]) & (xy[..., 1] >= 0) & (xy[..., 1] < size[1])


def old_select_points(pred, options):
    """``select_points`` of quantvggt <= a3d2b96, verbatim (part of the baseline's time)."""
    S, H, W = pred.depth.shape
    if options.points_from == "point_map":
        xyz, conf = pred.world_points, pred.world_points_conf
    else:
        xyz = unproject_depth(
            torch.from_numpy(pred.depth).double(),
            torch.from_numpy(pred.extrinsics),
            torch.from_numpy(pred.intrinsics),
            pixel_offset=0.5,
        ).numpy()
        conf = pred.depth_conf
    valid = np.stack([_old_valid_content_mask(tf, sz, H, W) for tf, sz in zip(pred.transforms, pred.original_sizes)])
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


def old_to_colmap(pred, options):
    """The per-point builder of quantvggt <= a3d2b96 (cameras, images, then one add_point3D per point)."""
    import pycolmap

    S, _H, W = pred.depth.shape
    cam_of = cm.colmap_cameras(pred, options.shared_camera_tol)
    rec = pycolmap.Reconstruction()
    intrinsics = pred.intrinsics.copy()
    for c in sorted(set(cam_of)):
        members = [i for i in range(S) if cam_of[i] == c]
        Ks = np.stack([pred.transforms[i].intrinsics_to_original(pred.intrinsics[i]) for i in members])
        K = Ks.mean(0)
        for i in members:
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
    f_idx, flat, xyz, _stats = old_select_points(replace(pred, intrinsics=intrinsics), options)
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
    return rec


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest wall time of ``repeat`` runs (the machine is shared; the minimum is the least disturbed)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_of(fn: Callable[[], object], repeat: int) -> float:
    """Least process CPU time (all threads) of ``repeat`` runs: less sensitive than wall time to other jobs."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def speed(model: torch.nn.Module, scene: Path, repeat: int) -> dict:
    """Old vs new export of 100k points from one prediction (same points: tracks off), and the new one with tracks."""
    pred = reconstruct_scene(model, scene, ReconstructionOptions(image_size=224))
    opts = cm.ExportOptions(max_points=100_000, tracks=False)
    out: dict = {"scene": scene.name, "model_input_hw": list(pred.depth.shape[1:]), "frames": len(pred.names)}
    with tempfile.TemporaryDirectory() as tmp:
        old_rec = old_to_colmap(pred, opts)
        built = cm.to_colmap(pred, opts)
        assert old_rec.num_points3D() == built.model.num_points == 100_000
        old = lambda: old_to_colmap(pred, opts).write(tmp)
        new = lambda: cm.to_colmap(pred, opts).model.write(tmp)
        for _ in range(2):  # interleaved, so both see the same background load
            out["old_s"] = min(out.get("old_s", np.inf), best_of(old, repeat))
            out["new_s"] = min(out.get("new_s", np.inf), best_of(new, repeat))
        out["old_cpu_s"], out["new_cpu_s"] = cpu_of(old, repeat), cpu_of(new, repeat)
        out["new_build_s"] = best_of(lambda: cm.to_colmap(pred, opts), repeat)
        tracked = cm.ExportOptions(max_points=100_000)
        res = cm.to_colmap(pred, tracked)
        out["tracks_points"] = res.model.num_points
        out["tracks_observations"] = int(res.model.obs_point.size)
        out["new_tracks_s"] = best_of(lambda: cm.to_colmap(pred, tracked).model.write(tmp), repeat)
        out["workspace_s"] = best_of(lambda: cm.write_workspace(res, Path(tmp) / "ws", tracked), repeat)
    out["speedup"] = out["old_s"] / out["new_s"]
    out["speedup_cpu"] = out["old_cpu_s"] / out["new_cpu_s"]
    return out


def _gt_points(pred, gt: dict, seeds: np.ndarray) -> np.ndarray:
    """Ground-truth 3D point at each seed pixel (nearest ground-truth depth, ground-truth camera); NaN on misses."""
    S, _H, W = pred.depth.shape
    f, pix = seeds[:, 0], seeds[:, 1]
    uv = np.stack([pix % W + 0.5, pix // W + 0.5], -1).astype(np.float64)
    idx = [gt["names"].index(n) for n in pred.names]
    out = np.full((len(f), 3), np.nan)
    for i in range(S):
        m = f == i
        xy = pred.transforms[i].to_original(uv[m])
        j = idx[i]
        d = gt["depth"][j][np.floor(xy[:, 1]).astype(int), np.floor(xy[:, 0]).astype(int)].astype(np.float64)
        K, E = gt["intrinsics"][j], gt["extrinsics"][j]
        cam = np.stack([(xy[:, 0] - K[0, 2]) / K[0, 0] * d, (xy[:, 1] - K[1, 2]) / K[1, 1] * d, d], -1)
        world = (cam - E[:, 3]) @ E[:, :3]  # R^T (x - t)
        out[m] = np.where((d > 0)[:, None], world, np.nan)
    return out


def _point_accuracy(xyz: np.ndarray, gt_xyz: np.ndarray) -> float:
    ok = np.isfinite(gt_xyz).all(1)
    scale = np.linalg.norm(gt_xyz[ok] - gt_xyz[ok].mean(0), axis=1).mean()
    return ev.point_metrics(xyz[ok], gt_xyz[ok], max_points=5000)["accuracy"] / scale


def _true_correspondence_px(res: cm.ColmapResult, pred, gt: dict, gt_xyz: np.ndarray) -> float:
    """Median distance (original px) of each non-seed observation from where the seed's true 3D point appears."""
    m = res.model
    idx = np.array([gt["names"].index(n) for n in pred.names])
    o = m.obs_image
    E, K = gt["extrinsics"][idx[o]], gt["intrinsics"][idx[o]]
    cam = np.einsum("mij,mj->mi", E[:, :, :3], gt_xyz[m.obs_point]) + E[:, :, 3]
    uv = np.stack([K[:, 0, 0] * cam[:, 0] / cam[:, 2] + K[:, 0, 2], K[:, 1, 1] * cam[:, 1] / cam[:, 2] + K[:, 1, 2]], 1)
    d = np.linalg.norm(uv - m.obs_xy, axis=1)
    other = (o != res.seeds[m.obs_point, 0]) & np.isfinite(d)
    return float(np.median(d[other])) if other.any() else float("nan")


def quality(model: torch.nn.Module, scenes: list[Path], tolerance: float) -> list[dict]:
    """Per scene: tracks, reprojection error, pose AUC@30 and point accuracy, feed-forward and after BA."""
    rows = []
    for scene in scenes:
        gt = load_gt(scene)
        pred = reconstruct_scene(model, scene, ReconstructionOptions())
        gt_extr = gt["extrinsics"][[gt["names"].index(n) for n in pred.names]]
        opts = cm.ExportOptions(track_tolerance=tolerance)
        t0 = time.perf_counter()
        ff = cm.to_colmap(pred, opts)
        t1 = time.perf_counter()
        ba = cm.to_colmap(pred, replace(opts, ba=True))
        t2 = time.perf_counter()
        gt_xyz = _gt_points(pred, gt, ff.seeds)
        b = ba.report["ba"]
        rows.append(
            {
                "scene": scene.name,
                "frames": len(pred.names),
                "points": ff.model.num_points,
                "mean_track": ff.report["tracks"]["mean_length"],
                "median_track": ff.report["tracks"]["median_length"],
                "obs_vs_truth_px": _true_correspondence_px(ff, pred, gt, gt_xyz),
                "reproj_mean_ff": b["before"]["mean"],
                "reproj_median_ff": b["before"]["median"],
                "reproj_mean_ba": b["after"]["mean"],
                "reproj_median_ba": b["after"]["median"],
                "ba_accepted": b["accepted"],
                "ba_converged": b["converged"],
                "auc30_ff": ev.pose_metrics(ff.model.cam_from_world, gt_extr)["auc@30"],
                "auc30_ba": ev.pose_metrics(ba.model.cam_from_world, gt_extr)["auc@30"],
                "point_acc_ff": _point_accuracy(ff.model.xyz, gt_xyz),
                "point_acc_ba": _point_accuracy(ba.model.xyz, gt_xyz),
                "export_s": t1 - t0,
                "export_ba_s": t2 - t1,
            }
        )
        r = rows[-1]
        print(
            f"{r['scene']}: {r['points']} pts, track mean {r['mean_track']:.2f} median {r['median_track']:.0f}, "
            f"reproj median {r['reproj_median_ff']:.3f} -> {r['reproj_median_ba']:.3f} px, "
            f"AUC@30 {r['auc30_ff']:.3f} -> {r['auc30_ba']:.3f}, "
            f"acc {r['point_acc_ff']:.4f} -> {r['point_acc_ba']:.4f}, "
            f"BA {'kept' if r['ba_accepted'] else 'discarded'}{'' if r['ba_converged'] else ' (not converged)'}, "
            f"{r['export_s']:.2f}s / {r['export_ba_s']:.2f}s",
            flush=True,
        )
    return rows


def main() -> None:
    """Run the benchmark and print a JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", required=True, help="synthetic scenes with ground truth (quantvggt synth)")
    p.add_argument("--model", default="vggt-tiny-synthetic")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--track-tolerance", type=float, default=cm.ExportOptions().track_tolerance)
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--quality-only", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_vggt(args.model)
    scenes = sorted(q.parent.parent for q in Path(args.scenes).glob("*/gt/cameras.json"))
    summary: dict = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if not args.quality_only:
        s = speed(model, scenes[0], args.repeat)
        print(
            f"export of 100k points ({s['frames']} frames at {s['model_input_hw']}): old {s['old_s']:.3f} s, "
            f"new {s['new_s']:.3f} s ({s['speedup']:.1f}x wall; CPU {s['old_cpu_s']:.3f} vs {s['new_cpu_s']:.3f} s, "
            f"{s['speedup_cpu']:.1f}x); with tracks {s['new_tracks_s']:.3f} s "
            f"({s['tracks_points']} points, {s['tracks_observations']} observations); "
            f"workspace (ply + database) {s['workspace_s']:.3f} s",
            flush=True,
        )
        summary["speed"] = s
    if not args.speed_only:
        rows = quality(model, scenes, args.track_tolerance)
        keys = [k for k in rows[0] if k not in ("scene", "ba_accepted", "ba_converged")]
        summary["quality_mean"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        summary["quality_mean"]["ba_accepted"] = sum(r["ba_accepted"] for r in rows)
        summary["quality_mean"]["ba_converged"] = sum(r["ba_converged"] for r in rows)
        summary["scenes"] = rows
        m = summary["quality_mean"]
        print(
            f"mean over {len(rows)} scenes: track mean {m['mean_track']:.2f} (median {m['median_track']:.1f}); "
            f"reproj median {m['reproj_median_ff']:.3f} -> {m['reproj_median_ba']:.3f} px; "
            f"AUC@30 {m['auc30_ff']:.4f} -> {m['auc30_ba']:.4f} ({m['auc30_ba'] - m['auc30_ff']:+.4f}); "
            f"point acc {m['point_acc_ff']:.4f} -> {m['point_acc_ba']:.4f}; BA kept {m['ba_accepted']}/{len(rows)}, "
            f"converged {m['ba_converged']}/{len(rows)}"
        )
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()

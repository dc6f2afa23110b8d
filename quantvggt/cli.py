"""Command-line interface: ``quantvggt <command>``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("quantvggt")
ASSETS = Path(__file__).resolve().parent / "assets"


def _demo_model(seed: int = 0) -> torch.nn.Module:
    from quantvggt.model import VGGT, VGGTConfig

    cfg = VGGTConfig.from_dict(json.loads((ASSETS / "vggt-tiny-config.json").read_text()))
    torch.manual_seed(seed)
    return VGGT(cfg).eval()


def _summarise(preds: dict, names: Sequence[str]) -> str:
    from quantvggt.geometry import pose_encoding_to_extri_intri

    H, W = preds["images"].shape[-2:]
    extr, K = pose_encoding_to_extri_intri(preds["pose_enc"][0], (H, W))
    lines = [f"{'image':<16} {'t (x,y,z)':<26} {'fx':>8} {'fy':>8} {'depth min/med/max':>24} {'conf':>6}"]
    for i, name in enumerate(names):
        t = extr[i, :, 3].tolist()
        d = preds["depth"][0, i, ..., 0]
        c = preds["depth_conf"][0, i]
        lines.append(
            f"{name:<16} {'(' + ', '.join(f'{v:+.3f}' for v in t) + ')':<26} {K[i, 0, 0]:8.1f} {K[i, 1, 1]:8.1f} "
            f"{f'{d.min():.3f}/{d.median():.3f}/{d.max():.3f}':>24} {c.mean():6.2f}"
        )
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    """Run a model on image files and print the predicted cameras and depth statistics."""
    from quantvggt.images import load_and_preprocess

    source = args.model if args.model != "demo-random" else "tiny config, seeded random weights (untrained)"
    model = _load_any(args.model)
    paths = [Path(p) for p in args.images]
    batch = load_and_preprocess(paths, mode=args.mode)
    t0 = time.perf_counter()
    with torch.no_grad():
        preds = model(batch.images)
    dt = time.perf_counter() - t0
    print(f"model: {source}")
    print(
        f"input: {len(paths)} images -> {tuple(batch.images.shape)}; forward {dt * 1000:.0f} ms on {batch.images.device}"
    )
    print(_summarise(preds, batch.names))
    return 0


def _load_any(source: str) -> torch.nn.Module:
    """A float model source, a quantized checkpoint (folder or s3://, has quant.json), or 'demo-random'."""
    from quantvggt.pipeline import load_model

    if source == "demo-random":
        return _demo_model()
    return load_model(source)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Calibrate and quantize a model, then write a quantized checkpoint folder."""
    from quantvggt.calib import folder_samples
    from quantvggt.quant import get_recipe, quantize_, save_quantized

    model = _load_any(args.model)
    overrides: dict = {"seed": args.seed}
    if args.scope:
        overrides["scope"] = tuple(args.scope)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    config = get_recipe(args.recipe, **overrides)
    calib = []
    for path in args.calibration:
        if str(path).endswith(".parquet"):
            from quantvggt.calib.nfds import load_selected

            calib += load_selected(path, image_size=model.image_size)
        else:
            calib += folder_samples([path], frames=args.frames, image_size=model.image_size)
    report = quantize_(model, config, calib)
    out = save_quantized(model, args.out, extra={"report": report.to_dict()})
    print(f"recipe {report.recipe}: {len(report.layers)} layers quantized in {report.seconds:.1f}s")
    print(
        f"bytes: {report.quantized_bytes:,} ({report.bytes_16bit:,} with floats at 16 bit); "
        f"fp16 {report.fp16_bytes:,} -> {report.compression_vs_fp16:.2f}x; fp32 {report.fp32_bytes:,} -> {report.compression_vs_fp32:.2f}x"
    )
    print(f"wrote {out}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct scene folders and write COLMAP models; one bad scene does not stop the others."""
    from tqdm import tqdm

    from quantvggt.reconstruct import ReconstructionOptions, SceneError
    from quantvggt.reconstruct import main as reconstruct_main

    model = _load_any(args.quantized or args.model)
    opts = ReconstructionOptions(
        max_frames=args.max_frames,
        conf_percentile=args.conf_percentile,
        conf_threshold=args.conf_threshold,
        max_points=args.max_points,
        text=args.text,
        points_from=args.points_from,
        mode=args.mode,
    )
    failed = 0
    for scene in tqdm(args.scenes, desc="scenes", unit="scene"):
        try:
            out = reconstruct_main(model, scene, args.out, opts)
            report = json.loads((out / "report.json").read_text())
            tqdm.write(
                f"{Path(scene).name}: {report['images']} images, {report['points']['kept']} points -> {out / 'sparse' / '0'}"
            )
        except (SceneError, ValueError, RuntimeError) as e:
            failed += 1
            tqdm.write(f"{Path(scene).name}: FAILED: {e}")
    print(f"{len(args.scenes) - failed} of {len(args.scenes)} scenes reconstructed into {args.out}")
    return 1 if failed else 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Render synthetic scenes with ground truth."""
    from quantvggt import synth

    w, h = (int(v) for v in args.size.lower().split("x"))
    out = synth.main(
        args.out, scenes=args.scenes, frames=args.frames, seed=args.seed, size=(w, h), overwrite=args.overwrite
    )
    print(f"wrote {args.scenes} scenes of {args.frames} frames ({w}x{h}) to {out}")
    return 0


def cmd_select_calibration(args: argparse.Namespace) -> int:
    """Run NFDS over a pool of scenes and write the selection manifest (+ PNG)."""
    from tqdm import tqdm

    from quantvggt.calib import nfds

    model = _load_any(args.model)
    out = nfds.main(
        model,
        args.pool,
        args.out,
        frames=args.frames,
        n_clusters=args.clusters,
        per_cluster=args.per_cluster,
        seed=args.seed,
        overwrite=True,
        progress=lambda xs: tqdm(xs, desc="statistics", unit="sample"),
    )
    rows = nfds.read_manifest(out)
    print(
        f"{sum(r['selected'] for r in rows)} selected of {len(rows)} candidates; {sum(r['outlier'] for r in rows)} filtered as outliers"
    )
    for r in rows:
        if r["outlier"]:
            print(f"  filtered {r['sample_id']}: {r['outlier_reason']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Float vs quantization recipes on a synthetic evaluation set; writes table.md/.csv, results.json, auc.png."""
    from quantvggt import evaluate, synth
    from quantvggt.calib import nfds

    out = Path(args.out)
    model = _load_any(args.model)
    pool = (
        Path(args.calibration_pool)
        if args.calibration_pool
        else synth.main(
            out / "calibration-pool", scenes=args.pool_scenes, frames=args.frames, seed=args.pool_seed, size=(224, 168)
        )
    )
    manifest = nfds.main(
        model,
        [pool],
        out / "calibration.parquet",
        frames=args.frames,
        n_clusters=args.clusters,
        per_cluster=args.per_cluster,
        seed=args.seed,
        overwrite=True,
    )
    calib = nfds.load_selected(manifest, image_size=model.image_size)
    overrides = {"quantvggt": {"epochs": args.epochs}} if args.epochs is not None else {}
    evaluate.main(
        lambda: _load_any(args.model), args.scenes, out, [r.strip() for r in args.recipes.split(",")], calib, overrides
    )
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'auc.png'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) the small synthetic-scene VGGT."""
    from quantvggt.train.loop import TrainConfig, export_model
    from quantvggt.train.loop import main as train_main

    cfg = TrainConfig(
        steps=args.steps, seed=args.seed, threads=args.threads, init_from=args.init_from, init_partial=args.init_partial
    )
    for name in ("lr", "batch_size", "pool_scenes", "warmup", "pool_refresh_every"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.patch_embed:
        cfg.model["aggregator"]["patch_embed"] = args.patch_embed
    out = train_main(
        args.out,
        cfg,
        max_minutes=args.max_minutes,
        device=args.device,
        workers=args.workers,
        schedule_by_time=args.schedule_by_time,
    )
    print(f"checkpoint in {out} (loss curve: {out / 'loss.png'})")
    if args.export:
        print(f"exported {export_model(out, args.export)} (float16 weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    p = argparse.ArgumentParser(prog="quantvggt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("predict", help="run a VGGT model on images and print cameras and depth statistics")
    s.add_argument("images", nargs="+", help="image files")
    s.add_argument("--model", default="facebook/VGGT-1B", help="hub id, local file/folder, s3:// URI, or 'demo-random'")
    s.add_argument("--mode", choices=["crop", "pad"], default="crop")
    s.set_defaults(func=cmd_predict)
    s = sub.add_parser("quantize", help="calibrate + quantize a model and write a quantized checkpoint")
    s.add_argument("--model", required=True, help="float model source (hub id, file, folder, s3://)")
    s.add_argument(
        "--calibration", nargs="+", required=True, help="scene image folders, or a selection manifest .parquet"
    )
    s.add_argument(
        "--recipe", default="quantvggt-w4a4", help="e.g. rtn-w4a4, quarot-w4a4, quantvggt-w4a4, quantvggt-w8a8"
    )
    s.add_argument("--out", required=True, help="output folder for the quantized checkpoint")
    s.add_argument("--frames", type=int, default=10, help="frames per calibration sample")
    s.add_argument("--scope", nargs="+", choices=["aggregator", "patch_embed", "camera_head"], help="parts to quantize")
    s.add_argument("--epochs", type=int, help="block-reconstruction epochs (quantvggt recipes)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_quantize)
    s = sub.add_parser("select-calibration", help="choose a calibration set with Noise-Filtered Diverse Sampling")
    s.add_argument("pool", nargs="+", help="scene folders, folders of scene folders, or a .csv/.parquet manifest")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, help="manifest .parquet (a .png plot is written beside it)")
    s.add_argument("--clusters", type=int, default=5)
    s.add_argument("--per-cluster", type=int, default=4)
    s.add_argument("--frames", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_select_calibration)
    s = sub.add_parser("evaluate", help="Table 1: float vs quantized recipes on synthetic scenes with ground truth")
    s.add_argument("--model", required=True)
    s.add_argument("--scenes", required=True, help="evaluation set (from `quantvggt synth`)")
    s.add_argument("--recipes", default=",".join(__import__("quantvggt.evaluate", fromlist=["x"]).DEFAULT_RECIPES))
    s.add_argument("--out", required=True)
    s.add_argument(
        "--calibration-pool", help="scene folders for NFDS (default: a fresh synthetic pool, seed --pool-seed)"
    )
    s.add_argument("--pool-scenes", type=int, default=40)
    s.add_argument("--pool-seed", type=int, default=7)
    s.add_argument("--frames", type=int, default=8)
    s.add_argument("--clusters", type=int, default=5)
    s.add_argument("--per-cluster", type=int, default=4)
    s.add_argument("--epochs", type=int, help="block-reconstruction epochs for quantvggt recipes")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_evaluate)
    s = sub.add_parser("train", help="train the small synthetic-scene VGGT (resumable)")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=12000)
    s.add_argument("--max-minutes", type=float, default=None)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--workers", type=int, default=0, help="data-loading processes (also render the pool in parallel)")
    s.add_argument(
        "--init-from",
        help="model source (folder, file, s3://, shipped name; same config) whose weights start a new run",
    )
    s.add_argument(
        "--init-partial", action="store_true", help="with --init-from: copy only tensors whose names and shapes match"
    )
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--pool-scenes", type=int)
    s.add_argument("--warmup", type=int)
    s.add_argument(
        "--pool-refresh-every", type=int, help="render a new scene into the pool every N samples (0: fixed pool)"
    )
    s.add_argument("--schedule-by-time", action="store_true", help="decay the learning rate over --max-minutes")
    s.add_argument("--patch-embed", help="'conv' or a ViT name such as vit_tiny14_reg (new runs only)")
    s.add_argument("--export", help="after training, write a float16 model folder here (what ships as an asset)")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("reconstruct", help="reconstruct scene folders into COLMAP sparse models")
    s.add_argument("scenes", nargs="+", help="scene folders of images")
    s.add_argument("--out", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--model", default="facebook/VGGT-1B", help="float model source")
    g.add_argument("--quantized", help="quantized checkpoint folder")
    s.add_argument("--max-frames", type=int, default=32)
    s.add_argument("--conf-percentile", type=float, default=50.0)
    s.add_argument(
        "--conf-threshold", type=float, default=None, help="absolute confidence threshold (overrides the percentile)"
    )
    s.add_argument("--max-points", type=int, default=100_000)
    s.add_argument("--points-from", choices=["depth", "point_map"], default="depth")
    s.add_argument("--mode", choices=["crop", "pad"], default="crop")
    s.add_argument("--text", action="store_true", help="also write COLMAP text files")
    s.set_defaults(func=cmd_reconstruct)
    s = sub.add_parser("synth", help="render synthetic scenes with ground truth")
    s.add_argument("out")
    s.add_argument("--scenes", type=int, default=3)
    s.add_argument("--frames", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="224x168", help="WxH")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synth)
    return p


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse, configure logging, run the subcommand; user errors exit 2 with a one-line message."""
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        for noisy in ("httpx", "werkzeug", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())

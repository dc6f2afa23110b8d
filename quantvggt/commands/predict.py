"""The ``quantvggt predict`` command: run a model on image files and print the predicted cameras and depth."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from quantvggt.geometry import pose_encoding_to_extri_intri


def summarise(preds: dict, names: Sequence[str]) -> str:
    """A table of per-image camera position, focal lengths, depth range and mean confidence."""
    H, W = preds["images"].shape[-2:]
    extr, K = pose_encoding_to_extri_intri(preds["pose_enc"][0].cpu(), (H, W))
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


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt predict``."""
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--model", default="facebook/VGGT-1B", help="hub id, local file/folder, s3:// URI, or 'demo-random'"
    )
    parser.add_argument("--mode", choices=["crop", "pad"], default="crop")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (zero graph breaks; pays off over many scenes of a few frame counts)",
    )


def run(args: argparse.Namespace) -> int:
    """Run a model on image files and print the predicted cameras and depth statistics."""
    from quantvggt.images import load_and_preprocess
    from quantvggt.quant.load import DEMO_RANDOM, load_model

    source = args.model if args.model != DEMO_RANDOM else "tiny config, seeded random weights (untrained)"
    paths = [Path(p) for p in args.images]
    # images first: a bad one (unreadable, or a header claiming 30000x30000) is a one-line ImageLoadError naming
    # the file, before the minutes a large model takes to load
    batch = load_and_preprocess(paths, mode=args.mode)
    model = load_model(args.model, compile=args.compile)
    images = batch.images.to(next(model.parameters()).device)
    t0 = time.perf_counter()
    with torch.no_grad():
        preds = model(images)
    dt = time.perf_counter() - t0
    print(f"model: {source}")
    print(f"input: {len(paths)} images -> {tuple(images.shape)}; forward {dt * 1000:.0f} ms on {images.device}")
    print(summarise(preds, batch.names))
    return 0

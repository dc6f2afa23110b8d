"""The ``quantvggt train`` command: train (or resume) the small synthetic-scene VGGT."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt train``."""
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--workers", type=int, default=0, help="data-loading processes (also render the pool in parallel)"
    )
    parser.add_argument(
        "--init-from",
        help="model source (folder, file, s3://, shipped name; same config) whose weights start a new run",
    )
    parser.add_argument(
        "--init-partial", action="store_true", help="with --init-from: copy only tensors whose names and shapes match"
    )
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--pool-scenes", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument(
        "--pool-refresh-every", type=int, help="render a new scene into the pool every N samples (0: fixed pool)"
    )
    parser.add_argument("--schedule-by-time", action="store_true", help="decay the learning rate over --max-minutes")
    parser.add_argument("--patch-embed", help="'conv' or a ViT name such as vit_tiny14_reg (new runs only)")
    parser.add_argument("--export", help="after training, write a float16 model folder here (what ships as an asset)")


def run(args: argparse.Namespace) -> int:
    """Train (or resume) the small synthetic-scene VGGT, then optionally export it."""
    from quantvggt.train.loop import TrainConfig, export_model, main

    cfg = TrainConfig(
        steps=args.steps, seed=args.seed, threads=args.threads, init_from=args.init_from, init_partial=args.init_partial
    )
    for name in ("lr", "batch_size", "pool_scenes", "warmup", "pool_refresh_every"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.patch_embed:
        cfg.model["aggregator"]["patch_embed"] = args.patch_embed
    out = main(
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

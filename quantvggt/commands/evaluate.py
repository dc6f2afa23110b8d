"""``quantvggt evaluate``: Table 1, float vs quantization recipes on synthetic scenes with ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantvggt.evaluate import DEFAULT_RECIPES, main


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt evaluate``."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenes", required=True, help="evaluation set (from `quantvggt synth`)")
    parser.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help="comma-separated; each recipe[@scope+scope...][@3.5x], e.g. quantvggt-w4a4@aggregator+camera_head@3x "
        "(the @Nx suffix chooses per-layer widths by sensitivity until the model is N times smaller than fp16)",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--calibration-pool", help="scene folders for NFDS (default: a fresh synthetic pool, seed --pool-seed)"
    )
    parser.add_argument("--pool-scenes", type=int, default=40)
    parser.add_argument("--pool-seed", type=int, default=7)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=5)
    parser.add_argument("--per-cluster", type=int, default=4)
    parser.add_argument("--epochs", type=int, help="block-reconstruction epochs for quantvggt recipes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--attention", choices=["sdpa", "int8"], help="frame/global attention of every row (default: sdpa)"
    )
    parser.add_argument("--overwrite", action="store_true", help="measure every row again (default: reuse OUT's rows)")


def run(args: argparse.Namespace) -> int:
    """Float vs quantization recipes on a synthetic evaluation set; writes table.md/.csv, results.json, auc.png."""
    from quantvggt import synth
    from quantvggt.calib import nfds
    from quantvggt.model.aggregator import set_attention
    from quantvggt.quant.load import load_model

    out = Path(args.out)
    model = load_model(args.model)
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
    # --epochs applies to the quantvggt family only: the other recipes have no block reconstruction
    overrides = {"quantvggt": {"epochs": args.epochs}} if args.epochs is not None else {}
    recipes = [r.strip() for r in args.recipes.split(",")]
    main(
        lambda: set_attention(load_model(args.model), args.attention),
        args.scenes,
        out,
        recipes,
        calib,
        overrides,
        overwrite=args.overwrite,
    )
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'auc.png'}")
    return 0

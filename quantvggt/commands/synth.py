"""``quantvggt synth``: render synthetic scenes with ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantvggt.synth import TRAJECTORIES, main


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT such as 224x168, got {text!r}") from None
    return w, h


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt synth``."""
    parser.add_argument("out")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_size, default=(224, 168), help="WxH")
    parser.add_argument(
        "--trajectory",
        choices=TRAJECTORIES,
        default="arc",
        help="camera path: a short arc (default), or long captures: orbit, walk, random (unordered names)",
    )
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Render synthetic scenes with ground truth."""
    w, h = args.size
    before = {p.name: p.stat().st_mtime_ns for p in Path(args.out).iterdir()} if Path(args.out).is_dir() else {}
    out = main(
        args.out,
        scenes=args.scenes,
        frames=args.frames,
        seed=args.seed,
        size=(w, h),
        overwrite=args.overwrite,
        trajectory=args.trajectory,
    )
    # main keeps existing scene folders unless --overwrite: say what was rendered and what was kept as it was
    made = [p for p in out.iterdir() if not p.name.startswith(".") and before.get(p.name) != p.stat().st_mtime_ns]
    print(f"wrote {len(made)} scenes of {args.frames} frames ({w}x{h}, {args.trajectory}) to {out}")
    if len(made) < args.scenes:
        print(
            f"kept {args.scenes - len(made)} existing scene folders as they were (their frames, size and seed may"
            " differ); --overwrite renders them again"
        )
    return 0

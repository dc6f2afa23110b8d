"""Checkpoint bytes, compression and calibration time per recipe and scope.

    python benchmarks/quant_size.py --arch tiny          # the parity-fixture architecture, seeded weights
    python benchmarks/quant_size.py --arch 1b            # VGGT-1B architecture, seeded weights (~5 GB RAM per copy)

Ratios are against the same model's fp16 / fp32 bytes measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from quantvggt.model import VGGT, VGGTConfig
from quantvggt.quant import get_recipe, quantize_, save_quantized

TINY = Path(__file__).resolve().parent.parent / "quantvggt" / "assets" / "vggt-tiny-config.json"


def main() -> None:
    """Run the size/time sweep and print a Markdown table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["tiny", "1b"], default="tiny")
    ap.add_argument("--recipes", default="rtn-w4a4,quarot-w4a4,quantvggt-w4a4,quantvggt-w8a8,quantvggt-w4a16")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--scopes", default="", help="e.g. aggregator,aggregator+patch_embed+camera_head+dpt_heads")
    ap.add_argument(
        "--no-track-head",
        action="store_true",
        help="build the model without the track head (unused for reconstruction)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = VGGTConfig.from_dict(json.loads(TINY.read_text())) if args.arch == "tiny" else VGGTConfig()
    if args.no_track_head:
        cfg.track_head = None
    base = VGGT(cfg).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    side = 56 if args.arch == "tiny" else 28
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(2, 3, side, side, generator=g) for _ in range(2)]
    scopes = (
        [
            ("aggregator",),
            ("aggregator", "patch_embed", "camera_head"),
            ("aggregator", "patch_embed", "camera_head", "dpt_heads"),
        ]
        if args.arch == "1b"
        else [("aggregator",), ("aggregator", "camera_head"), ("aggregator", "camera_head", "dpt_heads")]
    )
    if args.scopes:
        scopes = [tuple(s.split("+")) for s in args.scopes.split(",")]
    print(
        f"arch={args.arch} track_head={cfg.track_head is not None} "
        f"params={sum(p.numel() for p in base.parameters()):,} "
        f"calib={len(calib)}x{tuple(calib[0].shape)} epochs={args.epochs}"
    )
    print("| recipe | scope | layers | checkpoint MB | x vs fp16 (floats at 16 bit) | x vs fp32 | calib s |")
    print("|---|---|---|---|---|---|---|")
    for scope in scopes:
        for name in args.recipes.split(","):
            kw = {"scope": scope}
            if name.startswith("quantvggt"):
                kw["epochs"] = args.epochs
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            rep = quantize_(model, get_recipe(name, **kw), calib)
            dt = time.perf_counter() - t0
            if args.arch == "tiny":
                with tempfile.TemporaryDirectory() as d:
                    out = save_quantized(model, Path(d) / "ckpt")
                    mb = (out / "model.safetensors").stat().st_size / 1e6
            else:
                mb = rep.quantized_bytes / 1e6  # tensor bytes; the safetensors header adds < 1 MB
            print(
                f"| {name} | {'+'.join(scope)} | {len(rep.layers)} | {mb:.2f} | {rep.compression_vs_fp16:.2f} "
                f"| {rep.compression_vs_fp32:.2f} | {dt:.1f} |"
            )
            del model


if __name__ == "__main__":
    main()

"""``quantvggt quantize``: calibrate and quantize a model, then write a quantized checkpoint folder."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from quantvggt.quant.config import SHIPPED_SCOPE, recipe_overrides


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt quantize``."""
    parser.add_argument("--model", required=True, help="float model source (hub id, file, folder, s3://)")
    parser.add_argument(
        "--calibration", nargs="+", required=True, help="scene image folders, or a selection manifest .parquet"
    )
    parser.add_argument(
        "--recipe",
        default="quantvggt-w4a8",
        help="e.g. quantvggt-w4a8 (shipped), quantvggt-w4a4 (the paper), rtn-w4a4, quarot-w4a4",
    )
    parser.add_argument("--out", required=True, help="output folder for the quantized checkpoint")
    parser.add_argument("--frames", type=int, default=10, help="frames per calibration sample")
    parser.add_argument(
        "--scope",
        default=list(SHIPPED_SCOPE),
        nargs="+",
        choices=["aggregator", "patch_embed", "camera_head", "dpt_heads"],
        help="parts to quantize (default: the shipped scope, as the quantize flow and the demo)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--budget",
        type=_budget,
        help="mixed precision: per-layer widths {16, 8, 4} chosen by measured sensitivity "
        "until the model is this many times smaller than fp16, e.g. 3.5x",
    )
    size.add_argument("--max-mb", type=float, help="mixed precision: the same, for a size limit in MB (1e6 bytes)")
    size.add_argument(
        "--layer-bits", help="reuse a per-layer bit map: a quantized checkpoint folder (its quant.json) or a JSON file"
    )
    parser.add_argument("--epochs", type=int, help="block-reconstruction epochs (quantvggt recipes)")
    parser.add_argument("--seed", type=int, default=0)


def _budget(text: str) -> float:
    try:
        value = float(text.lower().removesuffix("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"budget must look like 3.5x, got {text!r}") from e
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"budget must be > 1x (smaller than fp16), got {text!r}")
    return value


class _ProgressBar:
    """A tqdm bar over quantize_'s reconstruction blocks; created on the first report (calibration-free recipes
    have no blocks and show none)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, step: str, done: int, total: int) -> None:
        """Advance to ``done`` of ``total``, naming the block just finished."""
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="reconstruct blocks", unit="block")
        self.bar.set_postfix_str(step.removeprefix("aggregator."), refresh=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    """Calibrate and quantize a model, then write a quantized checkpoint folder."""
    from quantvggt.calib import folder_samples
    from quantvggt.calib.nfds import load_selected
    from quantvggt.fsutil import check_output_folder
    from quantvggt.quant import get_recipe, quantize_, save_quantized
    from quantvggt.quant.load import load_model
    from quantvggt.quant.sensitivity import mixed_precision, read_layer_bits

    # the recipe first: a misspelt or foreign option fails before minutes of model loading and calibration
    overrides = recipe_overrides(args.seed, args.scope, args.epochs)
    if args.layer_bits:
        overrides["layer_bits"] = read_layer_bits(args.layer_bits)
    config = get_recipe(args.recipe, **overrides)
    inputs = _inputs(args)
    check_output_folder(args.out, inputs=inputs, own_marker="quant.json")  # never over data or an input
    model = load_model(args.model)
    calib = []
    for path in args.calibration:
        if str(path).endswith(".parquet"):
            calib += load_selected(path, image_size=model.image_size)
        else:
            calib += folder_samples([path], frames=args.frames, image_size=model.image_size)
    extra: dict[str, Any] = {}
    if args.budget or args.max_mb:
        max_bytes = int(args.max_mb * 1e6) if args.max_mb else None
        bits = mixed_precision(model, config, calib, budget=args.budget, max_bytes=max_bytes)
        config = dataclasses.replace(config, layer_bits=bits.layer_bits)
        extra["mixed_precision"] = bits.to_json()
        print(f"mixed precision: {bits.compression_vs_fp16:.2f}x smaller than fp16 (predicted)")
        for part, counts in bits.summary().items():
            print(f"  {part:24s} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    with _ProgressBar() as bar:
        report = quantize_(model, config, calib, on_progress=bar)
    out = save_quantized(model, args.out, extra={"report": report.to_dict(), **extra}, inputs=inputs)
    print(f"recipe {report.recipe}: {len(report.layers)} layers quantized in {report.seconds:.1f}s")
    print(
        f"bytes: {report.quantized_bytes:,} ({report.bytes_16bit:,} with floats at 16 bit); "
        f"fp16 {report.fp16_bytes:,} -> {report.compression_vs_fp16:.2f}x; "
        f"fp32 {report.fp32_bytes:,} -> {report.compression_vs_fp32:.2f}x"
    )
    print(f"wrote {out}")
    return 0


def _inputs(args: argparse.Namespace) -> list[str]:
    """What ``--out`` may not overlap: calibration folders, the scenes a manifest names, a local model."""
    from pathlib import Path

    from quantvggt.calib.nfds import read_manifest
    from quantvggt.storage import local_path

    inputs: list[str] = []
    for item in args.calibration:
        inputs.append(item)
        if str(item).endswith(".parquet") and Path(item).is_file():
            inputs += sorted({str(row["scene"]) for row in read_manifest(item)})
    model = local_path(args.model)
    if model is not None and model.exists():
        inputs.append(str(model))
    return inputs

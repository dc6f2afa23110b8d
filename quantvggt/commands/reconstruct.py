"""``quantvggt reconstruct``: scene folders (local, or any storage URI) to COLMAP models, through the one scene path."""

from __future__ import annotations

import argparse

from quantvggt.options import ReconstructionOptions, add_arguments, from_args


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt reconstruct``: the command's own, then every :class:`ReconstructionOptions` field."""
    parser.add_argument("scenes", nargs="+", help="scene folders of images (local paths or storage URIs)")
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
    kernels = parser.add_argument_group("CPU kernels (default: the model as loaded, fp32)")
    kernels.add_argument(
        "--float-dtype",
        choices=["auto", "fp32", "bf16"],
        help="dtype of every op that is not a quantized GEMM; auto: bf16 on CPUs with AMX-BF16/AVX512-BF16",
    )
    kernels.add_argument(
        "--cpu-gemm", choices=["auto", "onednn", "int_mm"], help="quantized GEMM; auto: oneDNN prepacked on VNNI/AMX"
    )
    add_arguments(parser, ReconstructionOptions, "reconstruction (scenes over --max-frames images go in chunks)")


def run(args: argparse.Namespace) -> int:
    """Reconstruct scene folders and write COLMAP models; one bad scene does not stop the others (exit 1)."""
    from tqdm import tqdm

    from quantvggt.export import check_formats
    from quantvggt.fsutil import check_outputs_outside_inputs
    from quantvggt.model.aggregator import set_attention
    from quantvggt.quant.load import is_quantized_source, load_model
    from quantvggt.reconstruct import SceneJob, reconstruct
    from quantvggt.scene import output_names, scene_source_key
    from quantvggt.storage import open_storage

    opts = from_args(ReconstructionOptions, args)
    check_formats(opts.formats)  # an unknown --export fails before the model is loaded
    for uri in (*args.scenes, args.out):
        if not str(uri).strip():
            raise ValueError("an empty path was given (--out '' or a scene ''): name a folder")
        open_storage(uri)  # an unknown scheme fails here, before the model is loaded
    if args.quantized and not is_quantized_source(args.quantized):
        raise ValueError(f"--quantized {args.quantized}: not a quantized checkpoint (no quant.json); for a float "
                         "model use --model")  # fmt: skip
    # refused before the model is loaded: two scenes writing one OUT/<name>, an output over an input folder
    scenes = list({scene_source_key(s): s for s in args.scenes}.values())  # a folder given twice is done once
    names = output_names(scenes, args.on_collision)
    out = open_storage(args.out)
    check_outputs_outside_inputs([out.uri(names[s]) for s in scenes], scenes)
    jobs = {s: SceneJob(s, args.out, names[s], opts, force=True) for s in scenes}
    chosen = {k: v for k, v in (("float_dtype", args.float_dtype), ("cpu_gemm", args.cpu_gemm)) if v is not None}
    model = set_attention(load_model(args.quantized or args.model, kernels=chosen or None), args.attention)
    if args.compile:  # after set_attention, so the compiled graph traces the attention actually used
        model = model.compile_()
    failed = 0
    for scene in tqdm(scenes, desc="scenes", unit="scene"):
        try:
            res = reconstruct(model, jobs[scene])
            tqdm.write(f"{res.scene}: {res.images} images, {res.points} points -> {res.output}/sparse/0")
        except Exception as e:  # one bad scene never stops the others (MemoryError, sqlite3 errors included)
            failed += 1
            kind = "" if isinstance(e, (ValueError, RuntimeError, OSError)) else f"{type(e).__name__}: "
            tqdm.write(f"{names[scene]}: FAILED: {kind}{e}")
    print(f"{len(scenes) - failed} of {len(scenes)} scenes reconstructed into {args.out}")
    return 1 if failed else 0

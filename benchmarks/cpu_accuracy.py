"""Issue 25 accuracy check: pose/depth of a quantized small model with the new CPU kernels vs the exact reference.

    quantvggt synth runs/evalset --scenes 10 --frames 8 --seed 0
    python benchmarks/cpu_accuracy.py --scenes runs/evalset --recipes quarot-w4a8,quarot-w4a4 --threads 2

Per recipe (over the demo scope ``aggregator+camera_head+dpt_heads``, calibration-free so every variant is the same
quantized weights), one quantized model evaluated three ways in this process:

* ``reference``: ``QuantLinear.forward_int`` (exact levels, float64 GEMM), fp32 float ops;
* ``onednn fp32``: ``KernelOptions(float_dtype="fp32")``: the prepacked oneDNN GEMM, fp32 float ops (what a CPU
  without bf16 runs; bit-identical GEMM outputs);
* ``default``: ``KernelOptions()``: on this CPU "auto" = oneDNN GEMM + bf16 float ops (the shipped configuration).

Prints AUC@30/15/5, depth abs-rel, delta1 and point accuracy per variant, and the relative change of AUC@30.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from quantvggt.evaluate import eval_scenes, evaluate_model
from quantvggt.kernels import cpu_info
from quantvggt.kernels.options import apply_kernel_options
from quantvggt.lowbit.registry import KernelOptions
from quantvggt.quant import get_recipe, quantize_
from quantvggt.quant.linear import QuantLinear


def main() -> None:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vggt-tiny-synthetic")
    ap.add_argument("--scenes", default="runs/evalset")
    ap.add_argument("--recipes", default="quarot-w4a8,quarot-w4a4")
    ap.add_argument("--scope", default="aggregator,camera_head,dpt_heads")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from quantvggt.quant.load import load_model

    scenes = eval_scenes(args.scenes)
    base = load_model(args.model)
    print(f"{args.model} on {len(scenes)} scenes ({args.scenes}); threads={torch.get_num_threads()}")
    print(f"CPU: {cpu_info.flags_line()}; oneDNN: {cpu_info.onednn_isa()}")
    print(
        "| recipe | kernels | AUC@30 | AUC@15 | AUC@5 | depth abs-rel | δ<1.25 | point acc. | AUC@30 vs reference | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for recipe in [r for r in args.recipes.split(",") if r]:
        q = copy.deepcopy(base)
        quantize_(q, get_recipe(recipe, scope=tuple(args.scope.split(","))))
        variants = {
            "reference": (q, None),
            "onednn fp32": (copy.deepcopy(q), KernelOptions(cpu_gemm="onednn", float_dtype="fp32")),
            "default": (copy.deepcopy(q), KernelOptions()),
        }
        for m in variants["reference"][0].modules():
            if isinstance(m, QuantLinear):
                m.backend = "int"
        ref_auc = None
        for name, (m, opts) in variants.items():
            if opts is not None:
                apply_kernel_options(m, opts)
            t0 = time.perf_counter()
            with torch.no_grad():
                r = evaluate_model(m, scenes)
            sec = time.perf_counter() - t0
            ref_auc = r["auc@30"] if ref_auc is None else ref_auc
            change = 100 * (r["auc@30"] - ref_auc) / ref_auc if ref_auc else 0.0
            print(
                f"| {recipe} | {name} | {r['auc@30']:.4f} | {r['auc@15']:.4f} | {r['auc@5']:.4f} | {r['abs_rel']:.4f} "
                f"| {r['delta1']:.4f} | {r['point_accuracy']:.4f} | {change:+.2f}% | {sec:.0f} |",
                flush=True,
            )
        apply_kernel_options(base, KernelOptions(float_dtype="fp32"))  # back to fp32 for the next recipe's copy


if __name__ == "__main__":
    main()

"""CPU: per-layer and whole-model latency of the 4-bit path vs float and vs the reference approach.

    python benchmarks/cpu_qlinear.py --layers          # the four VGGT-1B aggregator shapes at M tokens
    python benchmarks/cpu_qlinear.py --model tiny      # tiny model at several frame counts
    python benchmarks/cpu_qlinear.py --model 1b        # VGGT-1B architecture (seeded weights), small input

Every ratio printed is measured in this process against a baseline run in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, state_bytes, to_reference

from quantvggt.model import VGGT, VGGTConfig
from quantvggt.quant import get_recipe, quantize_
from quantvggt.lowbit.hadamard import random_signs
from quantvggt.quant.linear import FakeQuantLinear

SHAPES = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]


def layers(M: int, repeat: int) -> None:
    """Per-layer table for the aggregator shapes."""
    print(f"per layer, M={M} tokens, threads={torch.get_num_threads()}")
    print(
        "| K x N | fp32 ms | 4-bit (ours) ms | reference ms | ours vs fp32 | ours vs reference | weight bytes fp32 / ours |"
    )
    print("|---|---|---|---|---|---|---|")
    from common import ReferenceFakeQuantLinear

    for K, N in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(K, N)
        ql = FakeQuantLinear(lin, 4, 4, random_signs(K, 0), torch.rand(K) + 0.5).to_quant_linear()
        ref = ReferenceFakeQuantLinear(ql)
        x = torch.randn(M, K)
        with torch.no_grad():
            t_fp = bench(lambda: F.linear(x, lin.weight, lin.bias), repeat)
            t_q = bench(lambda: ql(x), repeat)
            t_r = bench(lambda: ref(x), repeat) if ref is not None else float("nan")
        wb = K * N * 4
        qb = ql.qweight.numel() + 4 * N + 4 * K + K
        print(
            f"| {K}x{N} | {t_fp * 1e3:.1f} | {t_q * 1e3:.1f} | {t_r * 1e3:.1f} | {t_fp / t_q:.2f}x | {t_r / t_q:.2f}x | {wb / 1e6:.1f} MB / {qb / 1e6:.2f} MB |"
        )


def whole_model(arch: str, frames_list: list[int], side: int, repeat: int, with_reference: bool = True) -> None:
    """Whole-model latency for float, ours (quantvggt-w4a4 weights, RTN-speed identical) and the reference approach."""
    torch.manual_seed(0)
    if arch == "tiny":
        cfg = VGGTConfig.from_dict(
            json.loads(
                (Path(__file__).resolve().parent.parent / "quantvggt" / "assets" / "vggt-tiny-config.json").read_text()
            )
        )
    else:
        cfg = VGGTConfig(track_head=None)
    base = VGGT(cfg).eval()
    q = copy.deepcopy(base)
    quantize_(q, get_recipe("quarot-w4a4", scope=("aggregator", "patch_embed") if arch == "1b" else ("aggregator",)))
    ref = to_reference(copy.deepcopy(q)) if with_reference else None
    print(
        f"whole model {arch}, {side}x{side} px, threads={torch.get_num_threads()}; state MB: float {state_bytes(base) / 1e6:.1f}, "
        f"ours {state_bytes(q) / 1e6:.1f}" + (f", reference {state_bytes(ref) / 1e6:.1f}" if ref is not None else "")
    )
    print("| frames | fp32 s | 4-bit (ours) s | reference s | ours vs fp32 | ours vs reference | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    import resource

    for S in frames_list:
        x = torch.rand(S, 3, side, side)
        with torch.no_grad():
            t_fp = bench(lambda: base(x), repeat)
            t_q = bench(lambda: q(x), repeat)
            t_r = bench(lambda: ref(x), repeat) if ref is not None else float("nan")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {S} | {t_fp:.3f} | {t_q:.3f} | {t_r:.3f} | {t_fp / t_q:.2f}x | {t_r / t_q:.2f}x | {rss:.0f} |")


def main() -> None:
    """CLI."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--model", choices=["tiny", "1b"])
    ap.add_argument("--frames", default="2,4,8")
    ap.add_argument("--side", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference approach (it needs ~2x the float model's memory)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers:
        layers(args.tokens, args.repeat)
    if args.model:
        side = args.side or (224 if args.model == "tiny" else 112)
        whole_model(args.model, [int(f) for f in args.frames.split(",")], side, args.repeat, not args.no_reference)


if __name__ == "__main__":
    main()

"""Whole-model GPU timings for a lent H100/H200 (one prepared script, fits in ~8 minutes).

    python benchmarks/gpu_e2e.py --out $OUT/e2e                 # VGGT-1B (seeded weights), 518 px, on CUDA
    python benchmarks/gpu_e2e.py --out /tmp/e2e --smoke         # tiny model on CPU: proves the script runs

For frames in --frames (default 1 10 20 50 100) it times {bf16 eager, bf16 compiled, 4-bit compiled} in this process
(median of --repeat CUDA-event timings after warm-up; compile time reported separately), records peak memory
(weights + activations, torch.cuda.max_memory_allocated), and writes results.json + results.md with the ratio table
and the upstream VGGT README's H100 + FlashAttention-3 column, plus a torch.profiler summary at 10 frames.
Every ratio is against a baseline measured here; nothing is estimated.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quantvggt.model import VGGT, VGGTConfig
from quantvggt.quant import get_recipe, quantize_
from quantvggt.testing import tiny_config_dict

UPSTREAM_H100_S = {1: 0.04, 2: 0.05, 4: 0.07, 8: 0.11, 10: 0.14, 20: 0.31, 50: 1.04, 100: 3.12, 200: 8.75}


def timed(fn: Callable[[], object], repeat: int, cuda: bool) -> float:
    """Median seconds of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as held (packed int4 counts as packed)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def build(smoke: bool, device: str) -> tuple[VGGT, VGGT, int]:
    """(bf16-autocast float model, 4-bit model, image size): seeded weights, track head off."""
    torch.manual_seed(0)
    cfg = VGGTConfig.from_dict({**tiny_config_dict(), "track_head": None}) if smoke else VGGTConfig(track_head=None)
    with torch.device(device):  # initialising 1.2 B parameters on the host would take longer than the timings
        base = VGGT(cfg).eval()
    q = copy.deepcopy(base)
    quantize_(q, get_recipe("quarot-w4a4", scope=("aggregator", "patch_embed", "camera_head")))
    return base, q, 56 if smoke else 518


def main() -> None:
    """Time every variant at every frame count; write JSON + Markdown."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 10, 20, 50, 100])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, frames 1 2 (checks the script)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    frames = [1, 2] if args.smoke else args.frames
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, q4, size = build(args.smoke, device)
    card = torch.cuda.get_device_name() if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    compiled_bf16 = copy.deepcopy(base).compile_(backend="inductor" if cuda else "aot_eager")
    compiled_q4 = q4.compile_(backend="inductor" if cuda else "aot_eager")
    variants = {"bf16 eager": base, "bf16 compiled": compiled_bf16, "4-bit compiled": compiled_q4}
    rows = []
    for s in frames:
        x = torch.rand(1, s, 3, size, size, device=device)
        row: dict[str, object] = {"frames": s}
        for name, model in variants.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)  # first call: compiles where compiled
                if cuda:
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                row[name] = timed(lambda m=model: m(x), args.repeat, cuda)
            row[f"{name} first call s"] = round(first, 2)
            row[f"{name} peak GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None
        row["upstream H100 FA3 s"] = UPSTREAM_H100_S.get(s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    profile = ""
    if cuda and 10 in frames:
        x = torch.rand(1, 10, 3, size, size, device=device)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            compiled_q4(x)
            torch.cuda.synchronize()
        profile = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    doc = {
        "device": card,
        "torch": torch.__version__,
        "weights_bytes": {"bf16": weight_bytes(base) // 2, "4-bit": weight_bytes(q4)},
        "rows": rows,
        "profile_10_frames": profile,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    md = [
        f"device: {card}, torch {torch.__version__}",
        "",
        "| frames | bf16 eager s | bf16 compiled s | 4-bit compiled s | 4-bit vs best bf16 | upstream H100 s "
        "| best bf16 vs upstream | peak GB bf16 / 4-bit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = min(r["bf16 eager"], r["bf16 compiled"])  # type: ignore[type-var]
        up = r["upstream H100 FA3 s"]
        md.append(
            f"| {r['frames']} | {r['bf16 eager']:.3f} | {r['bf16 compiled']:.3f} | {r['4-bit compiled']:.3f} "
            f"| {best / r['4-bit compiled']:.2f}x | {up if up is not None else 'n/a'} "
            f"| {f'{up / best:.2f}x' if up else 'n/a'} | {r['bf16 compiled peak GB']} / {r['4-bit compiled peak GB']} |"
        )
    (out / "results.md").write_text("\n".join(md) + "\n\n```\n" + profile + "\n```\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Whole-model GPU timings for a lent H100/H200 (one prepared script, fits in ~8 minutes).

    python benchmarks/gpu_e2e.py --out $OUT/e2e                 # VGGT-1B (seeded weights), 518 px, on CUDA
    python benchmarks/gpu_e2e.py --out /tmp/e2e --smoke         # tiny model on CPU: proves the script runs
    python benchmarks/gpu_e2e.py --out /tmp/e2e --dry-run       # print the plan (variants, frames, budget) and exit

Variants (``--variants`` picks a subset), all timed in this process on the same inputs:

    bf16 eager                  float VGGT-1B, bf16 autocast, exact SDPA attention
    bf16 compiled               the same, torch.compile (inductor)
    bf16 compiled int8-attn     + INT8 Q·K^T attention in the frame/global blocks (Triton kernel)
    4-bit split                 W4A4 (quarot-w4a4) compiled: LayerNorm, act_prep and packed-int4 GEMM as separate
                                kernels (the previous path; QUANTVGGT_TRITON_QLINEAR=split at call time)
    4-bit fused                 the same compiled model on the fused path: LayerNorm + rotation + smoothing +
                                quantization in one kernel (fuse_norms_) and the int8-MMA weight layout prepared at load
    4-bit fused int8-attn       + INT8 attention

Compiled variants compile the aggregator and camera head (--compile regions, default; the DPT heads stay eager in
every variant) or the whole forward (--compile model, which recompiles per frame count: see compile_variant).
For frames in --frames (default 1 10 20 50 100 200) each variant's first call (compilation where compiled) is
timed separately, then the median of --repeat CUDA-event timings after one warm-up; peak memory per variant
(activations: torch.cuda.max_memory_allocated above what was resident before the call; weights are reported
separately per format). An out-of-memory variant is recorded as "OOM". Before each
frame count the script extrapolates the previous one's time and skips the rest when --budget-s would be exceeded.
results.json and results.md are rewritten after every frame count, so a run cut short still leaves its rows.
Every ratio is against a baseline measured here; nothing is estimated. A torch.profiler summary of the fused 4-bit
model at 10 frames closes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from quantvggt.model import VGGT, VGGTConfig
from quantvggt.model.aggregator import set_attention
from quantvggt.quant import get_recipe, quantize_
from quantvggt.testing import tiny_config_dict

UPSTREAM_H100_S = {1: 0.04, 2: 0.05, 4: 0.07, 8: 0.11, 10: 0.14, 20: 0.31, 50: 1.04, 100: 3.12, 200: 8.75}
VARIANTS = (
    "bf16 eager",
    "bf16 compiled",
    "bf16 compiled int8-attn",
    "4-bit split",
    "4-bit fused",
    "4-bit fused int8-attn",
)
PATH_ENV = "QUANTVGGT_TRITON_QLINEAR"  # read per call by quantvggt.kernels.triton_w4a4.qlinear_forward


def timed(fn: Callable[[], object], repeat: int, cuda: bool) -> float:
    """Median seconds of ``fn`` after one warm-up call (the caller already made the compiling first call)."""
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


@contextlib.contextmanager
def qlinear_path(path: str | None) -> Iterator[None]:
    """Run the Triton QuantLinear on ``path`` ("split" | "fused"; ``None``: leave as is) inside the block."""
    old = os.environ.get(PATH_ENV)
    if path is not None:
        os.environ[PATH_ENV] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PATH_ENV, None)
        else:
            os.environ[PATH_ENV] = old


def compile_variant(model: VGGT, backend: str, how: str) -> VGGT:
    """``how`` = "model": ``VGGT.compile_`` (whole forward); "regions": the aggregator and camera head only.

    Whole-model graphs recompile for every frame count (the DPT heads loop over frame chunks in Python, which
    specialises the graph on S), costing a full inductor compile per variant and frame count; the regions become
    dynamic in S at the second size and hold nearly all of the FLOPs. The DPT heads then run eager in every variant.
    """
    if how == "model":
        return model.compile_(backend=backend)
    model.aggregator.compile(backend=backend)
    if model.camera_head is not None:
        model.camera_head.compile(backend=backend)
    return model


def build(
    smoke: bool, device: str, wanted: list[str], how: str = "regions"
) -> tuple[dict[str, tuple[VGGT, str | None]], dict, int]:
    """Variant name -> (model, Triton path); weight bytes; image size. Seeded weights, track head off."""
    torch.manual_seed(0)
    cfg = VGGTConfig.from_dict({**tiny_config_dict(), "track_head": None}) if smoke else VGGTConfig(track_head=None)
    with torch.device(device):  # initialising 1.2 B parameters on the host would take longer than the timings
        base = VGGT(cfg).eval()
    backend = "inductor" if device == "cuda" else "aot_eager"
    out: dict[str, tuple[VGGT, str | None]] = {}
    if "bf16 eager" in wanted:
        out["bf16 eager"] = (base, None)
    if "bf16 compiled" in wanted:
        out["bf16 compiled"] = (compile_variant(copy.deepcopy(base), backend, how), None)
    if "bf16 compiled int8-attn" in wanted:
        out["bf16 compiled int8-attn"] = (
            compile_variant(set_attention(copy.deepcopy(base), "int8"), backend, how),
            None,
        )
    q4 = copy.deepcopy(base)
    quantize_(q4, get_recipe("quarot-w4a4", scope=("aggregator", "patch_embed", "camera_head")))
    sizes = {"bf16": weight_bytes(base) // 2, "4-bit": weight_bytes(q4)}
    q4_int8 = set_attention(copy.deepcopy(q4), "int8") if "4-bit fused int8-attn" in wanted else None
    fused = {"norms fused": 0, "weights prepared": 0}
    if device == "cuda":  # the fused-path preparations (CUDA only: the CPU kernels do not use them)
        from quantvggt.kernels.triton_prep import fuse_norms_
        from quantvggt.kernels.triton_w4a4 import prepare_model_

        for m in (q4, q4_int8):
            if m is not None:
                fused["norms fused"] += fuse_norms_(m)  # before compile_: the graph traces the pass-through norms
                fused["weights prepared"] += prepare_model_(m)  # the int8-MMA layout, once, at load
    sizes["fused-path preparation"] = fused
    if {"4-bit split", "4-bit fused"} & set(wanted):
        q4c = compile_variant(q4, backend, how)  # one compiled graph: the path is switched per call by the environment
        if "4-bit split" in wanted:
            out["4-bit split"] = (q4c, "split")
        if "4-bit fused" in wanted:
            out["4-bit fused"] = (q4c, "fused")
    if q4_int8 is not None:
        out["4-bit fused int8-attn"] = (compile_variant(q4_int8, backend, how), "fused")
    return out, sizes, 56 if smoke else 518


def run_variant(model: VGGT, path: str | None, x: torch.Tensor, repeat: int, cuda: bool) -> dict[str, object]:
    """First call s, median s, activation peak GB (above resident weights) at one frame count; "OOM" if too big."""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0  # every variant's weights stay resident: subtract them
    try:
        with torch.no_grad(), qlinear_path(path):
            t0 = time.perf_counter()
            model(x)  # first call: compiles where compiled
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            median = timed(lambda: model(x), repeat, cuda)
    except torch.OutOfMemoryError:
        return {"s": "OOM", "first call s": None, "act peak GB": None}
    peak = round((torch.cuda.max_memory_allocated() - resident) / 1e9, 3) if cuda else None
    return {"s": median, "first call s": round(first, 2), "act peak GB": peak}


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(doc: dict) -> str:
    """The results table: seconds per variant, speed-ups against the best bf16 and the upstream H100 column."""
    names = doc["variants"]
    head = ["frames", *[f"{n} s" for n in names], "4-bit fused vs best bf16", "best 4-bit vs best bf16"]
    head += ["upstream H100 FA3 s", "activation peak GB (per variant)"]
    md = [f"device: {doc['device']}, torch {doc['torch']}", "", "| " + " | ".join(head) + " |"]
    md.append("|" + "---|" * len(head))
    for r in doc["rows"]:
        sec = {n: r[n]["s"] for n in names if n in r}
        num = {n: v for n, v in sec.items() if isinstance(v, float)}
        bf16 = [v for n, v in num.items() if n.startswith("bf16")]
        q4 = [v for n, v in num.items() if n.startswith("4-bit")]
        best16 = min(bf16) if bf16 else None
        fused = num.get("4-bit fused")
        cells = [str(r["frames"]), *[_fmt(sec.get(n, "skipped")) for n in names]]
        cells.append(f"{best16 / fused:.2f}x" if best16 and fused else "n/a")
        cells.append(f"{best16 / min(q4):.2f}x" if best16 and q4 else "n/a")
        cells.append(str(r.get("upstream H100 FA3 s") or "n/a"))
        cells.append(" / ".join(str(r[n]["act peak GB"]) for n in names if n in r))
        md.append("| " + " | ".join(cells) + " |")
    md += ["", f"weights: {json.dumps(doc['weights_bytes'])}"]
    if doc.get("skipped_frames"):
        md.append(f"skipped (time budget): {doc['skipped_frames']}")
    return "\n".join(md) + "\n"


def write(out: Path, doc: dict) -> None:
    """Rewrite results.json and results.md (called after every frame count)."""
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    if doc.get("profile_10_frames"):
        md += "\n```\n" + doc["profile_10_frames"] + "\n```\n"
    (out / "results.md").write_text(md)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 10, 20, 50, 100, 200])
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per variant and frame count (median)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="NAME")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip frame counts that would run past this")
    ap.add_argument(
        "--compile",
        choices=("regions", "model"),
        default="regions",
        help="regions: aggregator + camera head (one dynamic graph each); model: VGGT.compile_ (recompiles per S)",
    )
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, frames 1 2 (checks the script)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no model is built)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Time every variant at every frame count within the budget; write JSON + Markdown."""
    args = parse_args(argv)
    start = time.perf_counter()
    # Dynamo caches per code object: the compiled variants share VGGT.forward, each instance (x2 for the dynamic
    # frame axis) takes a cache entry, and past the default limit of 8 the rest would silently run eager
    torch._dynamo.config.recompile_limit = 64
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    frames = [1, 2] if args.smoke else sorted(args.frames)
    if args.dry_run:
        plan = {"device": device, "frames": frames, "variants": args.variants, "budget_s": args.budget_s}
        print(json.dumps({**plan, "compile": args.compile}))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants, sizes, size = build(args.smoke, device, args.variants, args.compile)
    card = torch.cuda.get_device_name() if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    doc: dict = {
        "device": card,
        "torch": torch.__version__,
        "variants": list(variants),
        "weights_bytes": sizes,
        "build_s": round(time.perf_counter() - start, 1),
        "compile": args.compile,
        "rows": [],
        "skipped_frames": [],
    }
    prev: tuple[int, float] | None = None
    for s in frames:
        elapsed = time.perf_counter() - start
        if prev is not None:
            est = prev[1] * (s / prev[0]) ** 1.5  # between linear (MLPs) and quadratic (global attention) in frames
            if elapsed + est > args.budget_s:
                doc["skipped_frames"] = [f for f in frames if f >= s]
                print(f"skipping frames {doc['skipped_frames']}: ~{est:.0f} s needed, {elapsed:.0f} s used", flush=True)
                break
        x = torch.rand(1, s, 3, size, size, device=device)
        row: dict[str, object] = {"frames": s, "upstream H100 FA3 s": UPSTREAM_H100_S.get(s)}
        for name, (model, path) in variants.items():
            row[name] = run_variant(model, path, x, args.repeat, cuda)
        del x
        doc["rows"].append(row)
        # steady-state cost of this frame count (first call + warm-up + repeats at the median): compiles excluded
        prev = (
            s,
            sum((args.repeat + 2) * r["s"] for r in row.values() if isinstance(r, dict) and isinstance(r["s"], float)),
        )
        print(json.dumps(row), flush=True)
        write(out, doc)
    if cuda and not args.no_profile and "4-bit fused" in variants and time.perf_counter() - start < args.budget_s:
        model, path = variants["4-bit fused"]
        x = torch.rand(1, 10, 3, size, size, device=device)
        with (
            torch.no_grad(),
            qlinear_path(path),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        ):
            model(x)
            torch.cuda.synchronize()
        doc["profile_10_frames"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    doc["total_s"] = round(time.perf_counter() - start, 1)
    write(out, doc)
    print(markdown(doc))


if __name__ == "__main__":
    main()

"""CPU: per-layer and whole-model latency of the 4-bit path vs fp32, bf16 and PyTorch's int8 dynamic quantization.

    python benchmarks/cpu_peers.py --layers --tokens 1044 --repeat 5 --threads 1   # VGGT-1B layer shapes
    python benchmarks/cpu_peers.py --layers --shapes camera --tokens 4             # camera head: M = S frames
    python benchmarks/cpu_peers.py --split --tokens 1044 --threads 1               # where one call's time goes
    python benchmarks/cpu_peers.py --model 1b --frames 4 --side 224 --repeat 5 --threads 1 \
        --contenders int8dyn,w8a8 --out cpu_1b.json                              # VGGT-1B, seeded weights
    python benchmarks/cpu_peers.py --model tiny --frames 2,4,8 --side 224

Contenders, all in this process, timed in interleaved rounds (each round runs every contender once; the median
round is reported, so load from other processes hits all of them alike):

* ``fp32``: ``F.linear`` / the float model;
* ``int8 dyn``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights, per-tensor dynamic int8 activations,
  fbgemm), what a user on a CPU cluster would call;
* ``bf16``: weights and activations in bfloat16 (per layer), ``torch.autocast("cpu", torch.bfloat16)`` (model);
* ``W4A4 speed`` / ``W4A4 memory``: our QuantLinear in :mod:`quantvggt.kernels.cpu`'s two modes (int8 weights
  cached at 1 byte/weight, or int4 unpacked per call);
* ``shipped``: W4A4 speed mode over the scope users get (``--model 1b``: + the DPT heads as weight-only int4,
  dequantized per call), so the float part left is the smallest;
* ``W8A8``: our quarot-w8a8 model (speed mode; 8-bit weights fall back to float GEMM where the CPU's integer GEMM
  is not exact for them, see :func:`quantvggt.kernels.cpu.int_gemm_exact`).

Resident weight bytes per model: parameters + buffers, plus the weights our speed mode holds in its GEMM's format
instead of the int4 buffers (int8 dyn: its packed int8 weights, 1 byte/weight, are counted from the ``nn.Linear``
shapes since the packed params are opaque).

``--rss DIR`` measures memory the way the operating system sees it: one fresh process per contender loads the model
from a checkpoint written once into DIR (fp32 and fp16 safetensors, our W4A4 folder), runs one forward, and reports
RSS after imports, after loading, after the forward (freed heap returned with ``malloc_trim``) and the peak (VmHWM)::

    python benchmarks/cpu_peers.py --model 1b --rss /tmp/rss1b --frames 4 --side 224 --threads 1

Every ratio is ``fp32 time / contender time`` (above 1 is faster than fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantvggt.kernels import cpu, cpu_info, cpu_native
from quantvggt.lowbit.hadamard import random_signs
from quantvggt.model import VGGT, VGGTConfig
from quantvggt.quant import get_recipe, quantize_
from quantvggt.quant.linear import FakeQuantLinear

SHAPES = {  # qkv, proj, fc1, fc2
    "aggregator": [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)],  # and DINOv2 patch embed; M = S x 261
    "camera": [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)],  # camera-head trunk; M = S frames
}


CLOCK = time.perf_counter  # --clock cpu: time.process_time, for 1-thread runs on a machine shared with other jobs


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: bool = True) -> dict[str, float]:
    """Median seconds per contender over ``repeat`` rounds that each run every contender once (after one warmup)."""
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def with_mode(mode: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with :data:`quantvggt.kernels.cpu.mode` set to ``mode``."""

    def run() -> object:
        prev, cpu.mode = cpu.mode, mode
        try:
            return fn()
        finally:
            cpu.mode = prev

    return run


def header() -> str:
    """One line naming the machine's kernels and threads."""
    native = "native kernels" if cpu_native.lib() is not None else "plain-torch kernels (no C compiler)"
    clock = "process CPU time" if CLOCK is time.process_time else "wall time"
    return (
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads={torch.get_num_threads()}, {native}, {clock}, load average {os.getloadavg()[0]:.1f}\n"
        f"CPU: {cpu_info.flags_line()}; oneDNN: {cpu_info.onednn_isa()}"
    )


def _layer(K: int, N: int, bits: int = 4) -> tuple[nn.Linear, nn.Module, nn.Module]:
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    ql = FakeQuantLinear(lin, bits, bits, random_signs(K, 0), torch.rand(K) + 0.5).to_quant_linear()
    dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, dtype=torch.qint8)
    return lin, ql, dyn


def layers(M: int, repeat: int, shapes: str) -> None:
    """Per-layer table for VGGT-1B layer shapes at ``M`` tokens."""
    print(f"per layer ({shapes} shapes), M={M} tokens; {header()}; median of {repeat} interleaved rounds")
    print(
        "| K x N | fp32 ms | int8 dyn ms | bf16 ms | W4A4 speed ms | W4A4 memory ms "
        "| W8A8 ms | int8 dyn vs fp32 | bf16 vs fp32 | **speed vs fp32** | memory vs fp32 | W8A8 vs fp32 "
        "| **speed vs int8 dyn** |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for K, N in SHAPES[shapes]:
        lin, ql, dyn = _layer(K, N)
        q8 = _layer(K, N, bits=8)[1]
        x = torch.randn(M, K)
        xb, wb, bb = x.bfloat16(), lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
        with torch.no_grad():
            t = interleaved(
                {
                    "fp32": lambda: F.linear(x, lin.weight, lin.bias),
                    "dyn": lambda: dyn(x),
                    "bf16": lambda: F.linear(xb, wb, bb),
                    "speed": with_mode("speed", lambda: ql(x)),
                    "memory": with_mode("memory", lambda: ql(x)),
                    "w8a8": with_mode("speed", lambda: q8(x)),
                },
                repeat,
            )
        ms = {k: v * 1e3 for k, v in t.items()}
        r = {k: t["fp32"] / v for k, v in t.items()}
        print(
            f"| {K}x{N} | {ms['fp32']:.1f} | {ms['dyn']:.1f} | {ms['bf16']:.1f} | {ms['speed']:.1f} | "
            f"{ms['memory']:.1f} | {ms['w8a8']:.1f} | {r['dyn']:.2f}x | {r['bf16']:.2f}x | **{r['speed']:.2f}x** | "
            f"{r['memory']:.2f}x | {r['w8a8']:.2f}x | **{t['dyn'] / t['speed']:.2f}x** |"
        )


def split(M: int, repeat: int, shapes: str) -> None:
    """Where one W4A4 call's time goes, per shape (ms)."""
    print(f"inside one W4A4 call, M={M} tokens; {header()}; median of {repeat} interleaved rounds")
    print(
        "| K x N | act quant (native) | act quant (torch) | int4 unpack | int8 GEMM | epilogue | whole call (speed) |"
    )
    print("|---|---|---|---|---|---|---|")
    for K, N in SHAPES[shapes]:
        _, ql, _ = _layer(K, N)
        packed = copy.deepcopy(ql)  # keeps its int4 buffer: speed mode frees ql's once it holds the int8 weights
        x = torch.randn(M, K)
        levels, s = cpu.act_quant(ql, x)
        w = cpu.gemm_weight(ql)
        acc = torch._int_mm(levels, w)
        native = cpu_native.lib() is not None
        fns = {
            "act": lambda: cpu.act_quant(ql, x),
            "act_torch": lambda: cpu.act_levels(ql, x),
            "unpack": lambda: cpu._unpack(packed),
            "gemm": lambda: torch._int_mm(levels, w),
            "epi": lambda: cpu._epilogue(acc.clone() if not native else acc, s, ql),
            "call": with_mode("speed", lambda: ql(x)),
        }
        with torch.no_grad():
            ms = {k: v * 1e3 for k, v in interleaved(fns, repeat).items()}
        print(
            f"| {K}x{N} | {ms['act']:.2f} | {ms['act_torch']:.2f} | {ms['unpack']:.2f} | {ms['gemm']:.2f} | "
            f"{ms['epi']:.2f} | {ms['call']:.2f} |"
        )


def bf16_autocast(model: nn.Module, x: torch.Tensor) -> object:
    """The float model under CPU bf16 autocast (how a user runs a float model in bf16)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x)


# whole-model contenders (--contenders): what each is, in the table's order
MODEL_CONTENDERS = {
    "fp32": "the float model",
    "int8dyn": "torch.ao quantize_dynamic, default engine (x86)",
    "int8dyn_onednn": "torch.ao quantize_dynamic, engine onednn",
    "bf16": "bf16 autocast over the fp32 model",
    "bf16model": "model.to(torch.bfloat16)",
    "bf16compile": "model.to(torch.bfloat16) + torch.compile (inductor, freezing)",
    "speed": "W4A4 aggregator scope, speed mode, portable GEMM, fp32",
    "memory": "W4A4 aggregator scope, memory mode, fp32",
    "w8a8": "W8A8 aggregator scope, speed mode, portable GEMM, fp32",
    "shipped_legacy": "shipped 4-bit model, pre-issue-25 path (_int_mm/fbgemm, fp32 float ops)",
    "shipped_fp32": "shipped 4-bit model, oneDNN prepacked GEMM, fp32 float ops",
    "shipped": "shipped 4-bit model, default KernelOptions (auto: oneDNN GEMM on AMX, _int_mm elsewhere; "
    "bf16 float ops on AMX/AVX512-BF16)",
    "shipped_compile": "shipped 4-bit model, default KernelOptions + compile",
}


def _with_kernels(gemm: str | None, mode: str | None, fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` run with the CPU GEMM / weight mode overridden (each contender holds its own prepacked weights)."""

    def run(*args: object) -> object:
        prev = cpu.gemm, cpu.mode
        cpu.gemm, cpu.mode = gemm, mode
        try:
            return fn(*args)
        finally:
            cpu.gemm, cpu.mode = prev

    return run


def _int8dyn(base: nn.Module, engine: str | None) -> tuple[nn.Module, Callable[[torch.Tensor], object]]:
    prev = torch.backends.quantized.engine
    if engine:
        torch.backends.quantized.engine = engine
    try:
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = prev

    def run(x: torch.Tensor) -> object:
        old = torch.backends.quantized.engine
        if engine:
            torch.backends.quantized.engine = engine
        try:
            return m(x)
        finally:
            torch.backends.quantized.engine = old

    return m, run


def whole_model(arch: str, frames_list: list[int], side: int, repeat: int, contenders: list[str]) -> dict[str, object]:
    """Whole-model latency of ``contenders`` (see :data:`MODEL_CONTENDERS`), all in this process, interleaved."""
    from quantvggt.kernels.options import apply_kernel_options
    from quantvggt.lowbit.registry import KernelOptions

    unknown = sorted(set(contenders) - set(MODEL_CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {sorted(MODEL_CONTENDERS)}")
    cols = [c for c in MODEL_CONTENDERS if c in contenders]
    torch.manual_seed(0)
    cfg, scope = _arch(arch)  # 1b: no track head (reconstruction never runs it)
    base = VGGT(cfg).eval()
    models: dict[str, nn.Module] = {"fp32": base, "bf16": base}
    runs: dict[str, Callable[[torch.Tensor], object]] = {
        "fp32": lambda x: base(x),
        "bf16": lambda x: bf16_autocast(base, x),
    }
    build_s: dict[str, float] = {}
    for engine, name in ((None, "int8dyn"), ("onednn", "int8dyn_onednn")):
        if name in cols:
            models[name], runs[name] = _int8dyn(base, engine)
    for name in ("bf16model", "bf16compile"):
        if name in cols:
            m = copy.deepcopy(base).to(torch.bfloat16)
            if name == "bf16compile":
                from quantvggt.kernels.options import compile_model

                compile_model(m)
            models[name] = m
            runs[name] = m
    agg = {"speed": ("quarot-w4a4", "speed"), "memory": ("quarot-w4a4", "memory"), "w8a8": ("quarot-w8a8", "speed")}
    for name, (recipe, mode) in agg.items():
        if name in cols:
            m = copy.deepcopy(base)
            quantize_(m, get_recipe(recipe, scope=scope))
            models[name] = m
            runs[name] = _with_kernels("int_mm", mode, m)
    shipped_names = [c for c in cols if c.startswith("shipped")]
    if shipped_names:
        q = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_(q, get_recipe("quarot-w4a4", scope=_shipped_scope(scope)))
        build_s["quantize"] = time.perf_counter() - t0
        for i, name in enumerate(shipped_names):
            m = q if i == len(shipped_names) - 1 else copy.deepcopy(q)
            gemm = {"shipped_legacy": "int_mm", "shipped_fp32": "onednn"}.get(name)
            opts = KernelOptions(float_dtype="fp32" if name in ("shipped_legacy", "shipped_fp32") else "auto")
            t0 = time.perf_counter()
            _with_kernels(gemm, "speed", lambda m=m, opts=opts: apply_kernel_options(m, opts))()
            if name == "shipped_compile":
                from quantvggt.kernels.options import compile_model

                compile_model(m)
            build_s[name] = time.perf_counter() - t0
            models[name] = m
            runs[name] = _with_kernels(gemm, "speed", m)
        del q
    print(
        f"whole model {arch}, {side}x{side} px; {header()}; median of {repeat} interleaved rounds "
        f"(after one warm-up round, which includes compilation)"
    )
    for c in cols:
        print(f"  {c}: {MODEL_CONTENDERS[c]}")
    ref = next((c for c in ("fp32", "bf16model", "bf16") if c in cols), cols[0])
    peers = [c for c in ("bf16model", "bf16compile", "int8dyn", "int8dyn_onednn", "bf16") if c in cols]
    print(f"| frames | {' | '.join(f'{c} s' for c in cols)} | " + " | ".join(f"shipped vs {p}" for p in peers) + " |")
    print("|---" * (1 + len(cols) + len(peers)) + "|")
    rows: list[dict[str, object]] = []
    for S in frames_list:
        x = torch.rand(S, 3, side, side)
        fns = {c: (lambda c=c: runs[c](x)) for c in cols}
        first: dict[str, float] = {}
        with torch.no_grad():
            for c, fn in fns.items():  # the warm-up round, timed: compile time = first call - steady call
                t0 = time.perf_counter()
                fn()
                first[c] = time.perf_counter() - t0
            t = interleaved(fns, repeat, warmup=False)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ratios = [t[p] / t["shipped"] for p in peers] if "shipped" in t else []
        print(
            f"| {S} | "
            + " | ".join(f"{t[c]:.2f}" for c in cols)
            + " | "
            + " | ".join(f"**{r:.2f}x**" for r in ratios)
            + f" |  (peak RSS so far {rss:.0f} MB)"
        )
        compiled = {c: first[c] - t[c] for c in cols if "compile" in c}
        if compiled:
            print(
                "  first call minus steady call (compilation, this frame count): "
                + ", ".join(f"{c} {v:.0f} s" for c, v in compiled.items())
            )
        rows.append({"frames": S, "seconds": t, "first_call_s": first, "peak_rss_mb": rss, "ref": ref})
    return {"arch": arch, "side": side, "repeat": repeat, "header": header(), "rows": rows, "build_s": build_s}


RSS_CONTENDERS = ("fp32", "fp16", "fp16->fp32", "int8dyn", "speed", "memory", "shipped")


def _shipped_scope(scope: tuple[str, ...]) -> tuple[str, ...]:
    return (*scope, "dpt_heads") if "camera_head" in scope else scope


def rss_mb() -> tuple[float, float]:
    """(current VmRSS, peak VmHWM) of this process in MB, from ``/proc/self/status``."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def trim() -> None:
    """Give freed heap back to the OS (glibc), so RSS shows what is live rather than what the allocator kept."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS then includes kept heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _arch(arch: str) -> tuple[VGGTConfig, tuple[str, ...]]:
    if arch == "tiny":
        cfg_path = Path(__file__).resolve().parent.parent / "quantvggt" / "assets" / "vggt-tiny-config.json"
        return VGGTConfig.from_dict(json.loads(cfg_path.read_text())), ("aggregator",)
    if arch.startswith("1b-d"):  # VGGT-1B widths and heads, aggregator cut to N blocks per kind (fits a time box)
        from dataclasses import replace

        from quantvggt.model.config import AggregatorConfig

        d = int(arch[4:])
        full = VGGTConfig(track_head=None)
        idx = [d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1]  # the heads read the same relative depths
        heads = {k: replace(getattr(full, k), intermediate_layer_idx=idx) for k in ("depth_head", "point_head")}
        return VGGTConfig(aggregator=AggregatorConfig(depth=d), track_head=None, **heads), (
            "aggregator",
            "patch_embed",
            "camera_head",
        )
    return VGGTConfig(track_head=None), ("aggregator", "patch_embed", "camera_head")


def write_checkpoints(arch: str, folder: Path) -> None:
    """fp32 and fp16 safetensors of the seeded model, its quarot-w4a4 folder and the shipped-scope one (each once)."""
    from safetensors.torch import save_file

    from quantvggt.quant import save_quantized

    cfg, scope = _arch(arch)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    todo = {
        "fp32": not (folder / "fp32.safetensors").is_file(),
        "fp16": not (folder / "fp16.safetensors").is_file(),
        "w4a4": not (folder / "w4a4" / "quant.json").is_file(),
        "shipped": not (folder / "shipped" / "quant.json").is_file(),
    }
    if not any(todo.values()):
        return
    torch.manual_seed(0)
    base = VGGT(cfg).eval()
    base.source = f"seeded {arch}"
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    if todo["fp32"]:
        save_file(sd, str(folder / "fp32.safetensors"))
    if todo["fp16"]:
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(folder / "fp16.safetensors")
        )
    del sd
    for name, sc in (("w4a4", scope), ("shipped", _shipped_scope(scope))):
        if todo[name]:
            q = copy.deepcopy(base)
            quantize_(q, get_recipe("quarot-w4a4", scope=sc))
            save_quantized(q, folder / name)
            del q


def rss_child(name: str, folder: Path, frames: int, side: int) -> dict[str, float]:
    """One contender in this (fresh) process: RSS after imports, after loading, after one forward, and the peak."""
    import safetensors.torch  # noqa: F401  (imported by the loaders: part of the baseline, not of the model)

    from quantvggt.model import load_vggt
    from quantvggt.quant.load import load_model

    # warm-up on the tiny architecture through the same kernels, so that lazily initialised libraries (oneDNN,
    # fbgemm, our native kernels) count in the baseline rather than as the model's weights
    tiny = VGGT(_arch("tiny")[0]).eval()
    quantize_(tiny, get_recipe("quarot-w4a4", scope=("aggregator",)))
    dyn = torch.ao.quantization.quantize_dynamic(VGGT(_arch("tiny")[0]).eval(), {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        for m in (tiny, dyn):
            m(torch.rand(2, 3, 56, 56))
    with torch.device("meta"):  # the loaders build on the meta device, which imports ~900 modules the first time
        VGGT(_arch("tiny")[0])
    del tiny, dyn
    cpu.mode = None
    trim()
    out = {"imports": rss_mb()[0]}
    cfg = VGGTConfig.from_dict(json.loads((folder / "config.json").read_text()))
    if name in ("fp32", "int8dyn"):
        model = load_vggt(str(folder / "fp32.safetensors"), config=cfg)
        if name == "int8dyn":
            model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    elif name in ("fp16", "fp16->fp32"):  # an fp16 checkpoint loaded as fp16, and as fp32 (what the library does)
        model = load_vggt(str(folder / "fp16.safetensors"), config=cfg, dtype=torch.float16 if name == "fp16" else None)
    else:
        cpu.mode = "speed" if name == "shipped" else name
        model = load_model(str(folder / ("shipped" if name == "shipped" else "w4a4")), device="cpu")
    trim()
    out["loaded"] = rss_mb()[0]
    out["peak_load"] = rss_mb()[1]
    if name != "fp16":  # CPU fp16 inference is not a contender here: only its load is measured
        with torch.no_grad():
            model(torch.rand(frames, 3, side, side))
        trim()
    out["after_forward"], out["peak"] = rss_mb()
    return out


def rss_table(arch: str, folder: Path, frames: int, side: int, threads: int) -> list[dict[str, object]]:
    """Each contender in its own process; one markdown table of RSS (MB)."""
    import subprocess

    write_checkpoints(arch, folder)
    print(f"RSS per contender, one process each ({arch}, {frames} frames x {side} px); {header()}")
    print("| model | baseline (warm-up) | after load | after 1 forward | resident (after forward - baseline) | peak |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in RSS_CONTENDERS:
        cmd = [sys.executable, __file__, "--rss-child", name, "--rss", str(folder), "--frames", str(frames)]
        cmd += ["--side", str(side), "--threads", str(threads or torch.get_num_threads())]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{name}: child failed:\n{res.stderr[-2000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        resident = r["after_forward"] - r["imports"] if name != "fp16" else r["loaded"] - r["imports"]
        rows.append({"model": name, **r, "resident": resident})
        fwd = "(load only)" if name == "fp16" else f"{r['after_forward']:.0f}"
        print(
            f"| {name} | {r['imports']:.0f} | {r['loaded']:.0f} (peak {r['peak_load']:.0f}) | {fwd} | "
            f"**{resident:.0f}** | {r['peak']:.0f} |"
        )
    return rows


def main() -> None:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", action="store_true", help="per-layer table")
    ap.add_argument("--split", action="store_true", help="per-stage breakdown of one W4A4 call")
    ap.add_argument("--tokens", type=int, default=1044, help="M: 4 frames x 261 tokens at 224 px")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="aggregator", help="layer shapes for --layers/--split")
    ap.add_argument("--model", help="tiny, 1b, or 1b-dN (1B widths, N aggregator blocks of each kind)")
    ap.add_argument("--frames", default="4")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (1 thread only), robust when other jobs share the cores",
    )
    ap.add_argument(
        "--contenders",
        default="fp32,int8dyn,int8dyn_onednn,bf16,bf16model,bf16compile,shipped_legacy,shipped",
        help="for --model, any of: " + ",".join(MODEL_CONTENDERS),
    )
    ap.add_argument("--out", type=Path, help="write the whole-model results as JSON here")
    ap.add_argument("--rss", type=Path, help="with --model: per-contender RSS, one process each; checkpoints in RSS")
    ap.add_argument("--rss-child", choices=RSS_CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=r".*(deprecat|migrat).*", category=Warning)  # torch.ao's notices
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            ap.error("--clock cpu sums the CPU time of all threads: use it with --threads 1")
        global CLOCK
        CLOCK = time.process_time
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss, int(args.frames.split(",")[0]), args.side)))
        return
    if args.rss:
        if not args.model:
            ap.error("--rss needs --model")
        rows = rss_table(args.model, args.rss, int(args.frames.split(",")[0]), args.side, args.threads)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))
        return
    if args.layers:
        layers(args.tokens, args.repeat, args.shapes)
    if args.split:
        split(args.tokens, args.repeat, args.shapes)
    if args.model:
        res = whole_model(
            args.model,
            [int(f) for f in args.frames.split(",")],
            args.side,
            args.repeat,
            [c for c in args.contenders.split(",") if c],
        )
        if args.out:  # JSON, and the same rows as a markdown table beside it (.md)
            args.out.write_text(json.dumps(res, indent=2))
            lines = [f"{res['arch']}, {res['side']} px; {res['header']}; median of {res['repeat']} rounds", ""]
            lines += ["| frames | model | seconds | first call s | model s / shipped s |", "|---|---|---|---|---|"]
            for row in res["rows"]:  # type: ignore[union-attr]
                t, first = row["seconds"], row["first_call_s"]
                lines += [
                    f"| {row['frames']} | {k} | {v:.3f} | {first[k]:.1f} | "
                    + (f"{v / t['shipped']:.2f}x |" if "shipped" in t else "- |")
                    for k, v in t.items()
                ]
            args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""INT8 attention vs bf16 SDPA at VGGT-1B's global-attention shapes, and the whole model with either attention.

    python -m pytest -q tests/kernels/test_triton_attention.py     # on the GPU: real kernels vs the reference
    python benchmarks/gpu_attention.py OUT                         # on a lent H100/H200: JSON + Markdown in OUT
    python benchmarks/gpu_attention.py OUT --smoke                 # anywhere: Triton interpreter, tiny shapes

Attention part (heads 16, head dim 64, N = S x 1374 tokens = S frames at 518 px, batch 1): q and k are LayerNorm'd
(as VGGT's QK-norm makes them), k with a shared per-channel offset (as the qkv/LayerNorm biases give it), all in bf16.
Timed with CUDA events, median of ``--repeat`` calls after a warmup: ``F.scaled_dot_product_attention`` in bf16
(PyTorch picks flash attention), and our INT8 attention (quantize Q/K + K-mean, then the attention kernel), also split
into the two. Errors on a block of 1024 query rows (all keys): int8 and bf16 SDPA against fp32 SDPA, the kernel
against the plain-torch reference (same rows), and level mismatches of the quantization kernel against the reference.

Model part (``--model-frames``): VGGT-1B with seeded weights (no track head) under the model's own bf16 autocast,
one forward at S frames of 518 px, exact vs int8 attention (same weights, :func:`set_attention`).

``--smoke`` runs every step on the CPU in the Triton interpreter at tiny shapes (2 heads, 37 tokens per frame, the
tiny model), so the script is known to work before a GPU is lent; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F

from quantvggt.lowbit.attention import BLOCK_K, BLOCK_Q, int8_attention_ref, k_mean, quantize_per_block

TOKENS_PER_FRAME = 1374  # 37 x 37 patches at 518 px + camera token + 4 register tokens
ROWS = 1024  # query rows whose errors are measured (a multiple of BLOCK_Q: the rows quantize as in the full run)


def timer(dev: str) -> Callable[[Callable[[], object], int], float]:
    """Median milliseconds of ``fn`` over ``repeat`` calls after one warmup (CUDA events on a GPU)."""

    def cuda_ms(fn: Callable[[], object], repeat: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cuda_ms if dev == "cuda" else cpu_ms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def attention_case(S: int, heads: int, tokens: int, dev: str, repeat: int) -> dict:
    """Timings and errors at S frames."""
    from quantvggt.kernels import triton_attention as ta

    ms = timer(dev)
    N, D = S * tokens, 64
    g = torch.Generator(device=dev).manual_seed(S)
    q = F.layer_norm(torch.randn(1, heads, N, D, device=dev, generator=g), (D,)).bfloat16()
    offset = 0.5 * torch.randn(D, device=dev, generator=g)
    k = (F.layer_norm(torch.randn(1, heads, N, D, device=dev, generator=g), (D,)) + offset).bfloat16()
    v = torch.randn(1, heads, N, D, device=dev, generator=g).bfloat16()
    sdpa_dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # CPU smoke: no fast bf16 SDPA there

    # correctness first (and the kernels compiled/autotuned before timing)
    out = ta.int8_attention(q, k, v)
    r0 = ((N // 2) // BLOCK_Q) * BLOCK_Q  # a block-aligned slice of query rows in the middle
    r1 = min(N, r0 + ROWS)
    rows = slice(r0, r1)
    exact = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    ref = int8_attention_ref(q[:, :, rows], k, v).float()
    bf16 = F.scaled_dot_product_attention(q.to(sdpa_dtype), k.to(sdpa_dtype), v.to(sdpa_dtype))[:, :, rows]
    lv_q, _ = ta.quantize_blocks(q.reshape(heads, N, D), BLOCK_Q)
    lv_k, _ = ta.quantize_blocks(k.reshape(heads, N, D), BLOCK_K, k_mean(k).reshape(heads, D))
    ref_q, _ = quantize_per_block(q, BLOCK_Q)
    ref_k, _ = quantize_per_block(k, BLOCK_K, k_mean(k))
    mismatch = float(
        ((lv_q != ref_q.reshape(heads, N, D)).sum() + (lv_k != ref_k.reshape(heads, N, D)).sum()) / (2 * lv_q.numel())
    )
    row = {
        "frames": S,
        "tokens": N,
        "heads": heads,
        "head_dim": D,
        "rel_err_int8_vs_fp32": _rel(out[:, :, rows], exact),
        "rel_err_sdpa_bf16_vs_fp32": _rel(bf16, exact),
        "rel_err_kernel_vs_reference": _rel(out[:, :, rows], ref),
        "level_mismatch_vs_reference": mismatch,
    }
    del exact, ref, bf16, lv_q, lv_k, ref_q, ref_k

    # a long sequence takes seconds per call: fewer repeats there
    t_one = ms(lambda: F.scaled_dot_product_attention(q.to(sdpa_dtype), k.to(sdpa_dtype), v.to(sdpa_dtype)), 1)
    n = max(3, min(repeat, int(3000 / max(t_one, 1e-3))))
    qs, ks, vs = q.to(sdpa_dtype), k.to(sdpa_dtype), v.to(sdpa_dtype)
    row["sdpa_ms"] = ms(lambda: F.scaled_dot_product_attention(qs, ks, vs), n)
    row["int8_ms"] = ms(lambda: ta.int8_attention(q, k, v), n)

    def prep() -> tuple:
        qa = ta.quantize_blocks(q.reshape(heads, N, D), BLOCK_Q)
        ka = ta.quantize_blocks(k.reshape(heads, N, D), BLOCK_K, k_mean(k).reshape(heads, D))
        return qa, ka

    row["int8_prep_ms"] = ms(prep, n)
    (q_lv, q_s), (k_lv, k_s) = prep()
    vb = v.reshape(heads, N, D)

    def kernel_only() -> torch.Tensor:
        return ta.attend_quantized(q_lv, q_s, k_lv, k_s, vb, D**-0.5)

    row["int8_attn_ms"] = ms(kernel_only, n)
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["int8_ms"]
    row["repeats"] = n
    best = getattr(ta._attn_fwd_tuned, "best_config", None)
    row["tile"] = str(best) if best is not None else None
    return row


def model_case(S: int, side: int, dev: str, smoke: bool, repeat: int) -> dict:
    """One forward of the whole model at S frames: exact vs int8 attention."""
    from quantvggt.model import VGGT, VGGTConfig
    from quantvggt.model.aggregator import set_attention

    ms = timer(dev)
    torch.manual_seed(0)
    if smoke:
        from quantvggt.testing import tiny_config_dict

        cfg = VGGTConfig.from_dict({**tiny_config_dict(), "track_head": None})
    else:
        cfg = VGGTConfig(track_head=None)
    with torch.device(dev):
        model = VGGT(cfg).eval()
    images = torch.rand(S, 3, side, side, device=dev, generator=torch.Generator(device=dev).manual_seed(S))
    row: dict = {"frames": S, "side": side}
    outs = {}
    with torch.no_grad():
        for kind in ("sdpa", "int8"):
            set_attention(model, kind)
            outs[kind] = model(images)
            row[f"{kind}_ms"] = ms(lambda: model(images), repeat)
    row["speedup"] = row["sdpa_ms"] / row["int8_ms"]
    for key in ("pose_enc", "depth"):
        row[f"rel_diff_{key}"] = _rel(outs["int8"][key], outs["sdpa"][key])
    return row  # the model and its outputs are freed on return (main empties the CUDA cache)


def write(out: Path, meta: dict, attn: list[dict], model: list[dict]) -> None:
    """``gpu_attention.json`` and ``gpu_attention.md`` in ``out`` (rewritten after every case)."""
    (out / "gpu_attention.json").write_text(json.dumps({**meta, "attention": attn, "model": model}, indent=1))
    smoke = " (SMOKE: interpreter, tiny shapes; the numbers mean nothing)" if meta["smoke"] else ""
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}{smoke}", ""]
    lines += [
        "| frames | tokens | bf16 SDPA ms | int8 ms (prep + attn) | prep ms | attn ms | int8 vs SDPA | rel err int8 "
        "| rel err bf16 SDPA | kernel vs ref | level mismatch |",
        "|---" * 11 + "|",
    ]
    for r in attn:
        lines.append(
            f"| {r['frames']} | {r['tokens']} | {r['sdpa_ms']:.3f} | {r['int8_ms']:.3f} | {r['int8_prep_ms']:.3f} "
            f"| {r['int8_attn_ms']:.3f} | {r['speedup_vs_sdpa']:.2f}x | {r['rel_err_int8_vs_fp32']:.2e} "
            f"| {r['rel_err_sdpa_bf16_vs_fp32']:.2e} | {r['rel_err_kernel_vs_reference']:.2e} "
            f"| {r['level_mismatch_vs_reference']:.1e} |"
        )
    if model:
        lines += ["", "| frames | side | exact s | int8 attention s | speedup | pose rel diff | depth rel diff |"]
        lines.append("|---" * 7 + "|")
        for r in model:
            lines.append(
                f"| {r['frames']} | {r['side']} | {r['sdpa_ms'] / 1e3:.3f} | {r['int8_ms'] / 1e3:.3f} "
                f"| {r['speedup']:.2f}x | {r['rel_diff_pose_enc']:.2e} | {r['rel_diff_depth']:.2e} |"
            )
    (out / "gpu_attention.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    """Parse arguments, run the cases that fit the time budget, write JSON + Markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (gpu_attention.json, gpu_attention.md)")
    p.add_argument("--frames", default="1,10,20,50,100,200", help="attention cases: frames at 1374 tokens each")
    p.add_argument("--model-frames", default="1,10,50,100", help="whole-model cases ('' for none)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--model-repeat", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining cases after this many seconds")
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (checks the script)")
    args = p.parse_args()
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke to check the script on a CPU")
    dev = "cpu" if smoke else "cuda"
    heads, tokens, side = (2, 37, 56) if smoke else (16, TOKENS_PER_FRAME, 518)
    frames = [int(s) for s in args.frames.split(",") if s]
    model_frames = [int(s) for s in args.model_frames.split(",") if s]
    if smoke:
        frames, model_frames = [1, 2], [2] if model_frames else []  # 37 and 74 tokens: N not a multiple of the tiles
    meta = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.machine()}), Triton interpreter",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": smoke,
        "block_q": BLOCK_Q,
        "block_k": BLOCK_K,
    }
    t0 = time.perf_counter()
    attn: list[dict] = []
    model: list[dict] = []
    for S in frames:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"budget spent: attention at {S} frames skipped", flush=True)
            continue
        try:
            attn.append(attention_case(S, heads, tokens, dev, args.repeat))
        except torch.cuda.OutOfMemoryError as e:  # 200 frames may not fit: keep what was measured
            print(f"{S} frames: out of memory ({e})", flush=True)
            torch.cuda.empty_cache()
            continue
        print(json.dumps(attn[-1]), flush=True)
        write(out, meta, attn, model)
    for S in model_frames:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"budget spent: model at {S} frames skipped", flush=True)
            continue
        try:
            model.append(model_case(S, side, dev, smoke, args.model_repeat))
        except torch.cuda.OutOfMemoryError as e:
            print(f"model at {S} frames: out of memory ({e})", flush=True)
            torch.cuda.empty_cache()
            continue
        if dev == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(model[-1]), flush=True)
        write(out, meta, attn, model)
    write(out, meta, attn, model)
    print((out / "gpu_attention.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

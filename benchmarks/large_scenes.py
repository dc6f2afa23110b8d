"""Large scenes: chunked inference vs one pass, in accuracy (pose AUC@30, registered images), time and peak memory.

    python benchmarks/large_scenes.py --out runs/large                      # every section
    python benchmarks/large_scenes.py --out runs/large --sections cost      # one section
    python benchmarks/large_scenes.py --out runs/large --sections ray --ray-workers 1,2 --ray-frames 240

Sections (synthetic scenes at 112x84 px, the shipped ``vggt-tiny-synthetic`` model on the CPU):

- ``accuracy``: 64-frame scenes, where one pass still fits: AUC@30 of one pass vs each chunked design over the same
  frames, per trajectory (arc: the training distribution; orbit/walk: long ordered captures; random: a shuffled
  orbit).
- ``long``: 240-frame scenes: AUC@30, registered images and failed chunks of each design (and one pass for reference).
- ``cost``: time and peak memory of ``reconstruct_scene`` at 60/120/240 frames, one pass vs chunked, each run in a
  fresh process whose peak RSS is reset (Linux ``/proc/self/clear_refs``) after the model is loaded and warmed up;
  "peak" is that peak over the RSS at the reset, "result" the arrays of the returned prediction (every frame's
  maps, the same for both) and "working" peak minus result.
- ``ray`` (not in the default set): one scene's chunks as Ray map/reduce (``workers.reconstruct.run_scenes``) on 1, 2,
  ... workers of one CPU each (``--ray-workers``) in one local Ray, against the same scene reconstructed in this
  process; wall time of the whole run (actors started, model loaded) and of the scene (plan to upload).

Scenes are rendered once under ``OUT/scenes`` and reused. Markdown tables go to stdout and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantvggt import eval as ev
from quantvggt import synth
from quantvggt.reconstruct import ReconstructionOptions, reconstruct_scene

SIZE = (112, 84)
MODEL = "vggt-tiny-synthetic"
# what each column runs; "single" sets max_frames to the scene size, the chunked ones keep max_frames=32
DESIGNS: dict[str, dict[str, Any]] = {
    "single": {},
    "sequential": {"chunking": "sequential"},
    "sequential, name order": {"chunking": "sequential", "order": "name"},
    "anchors (even)": {"chunking": "anchors"},
    "anchors (features)": {"chunking": "anchors", "anchor_select": "features"},
}


def scene(root: Path, trajectory: str, frames: int, seed: int) -> Path:
    """Render (once) and return a synthetic scene folder with ground truth."""
    folder = root / "scenes" / f"{trajectory}_{frames}_{seed}"
    if not folder.exists():
        synth.make_scene(folder, 7000 + seed, frames, SIZE[0], SIZE[1], trajectory)
    return folder


def options_for(design: str, frames: int, chunk_size: int) -> ReconstructionOptions:
    """The reconstruction options of one column."""
    if design == "single":
        return ReconstructionOptions(max_frames=frames)
    return ReconstructionOptions(max_frames=chunk_size, **DESIGNS[design])


def score(model: torch.nn.Module, folder: Path, opts: ReconstructionOptions) -> dict[str, Any]:
    """AUC@30 over the registered images, registered count, failed chunks, seconds."""
    gt = synth.load_gt(folder)
    t0 = time.perf_counter()
    pred = reconstruct_scene(model, folder, opts)
    seconds = time.perf_counter() - t0
    idx = [gt["names"].index(n) for n in pred.names]
    chunking = pred.report.get("chunking") or {}
    per_chunk = chunking.get("per_chunk", [])
    residuals = [c["residual"] for c in per_chunk if c.get("residual") is not None]
    return {
        "auc30": ev.pose_metrics(pred.extrinsics, gt["extrinsics"][idx])["auc@30"],
        "registered": len(pred.names),
        "frames": len(gt["names"]),
        "failed_chunks": sum(c["status"] == "failed" for c in per_chunk),
        "chunks": len(per_chunk),
        "max_residual": max(residuals, default=None),
        "order": chunking.get("order"),
        "seconds": seconds,
    }


def accuracy_table(model: torch.nn.Module, root: Path, frames: int, trajectories: list[str], seeds: int, chunk: int):
    """Mean AUC@30 per trajectory and design (and % of one pass), plus registered images."""
    rows = []
    for traj in trajectories:
        res: dict[str, list[dict]] = {d: [] for d in DESIGNS}
        for s in range(seeds):
            folder = scene(root, traj, frames, s)
            for d in DESIGNS:
                res[d].append(score(model, folder, options_for(d, frames, chunk)))
                print(f"  {traj} seed {s} {d}: {res[d][-1]}", file=sys.stderr, flush=True)
        single = np.mean([r["auc30"] for r in res["single"]])
        cells = []
        for d in DESIGNS:
            auc = np.mean([r["auc30"] for r in res[d]])
            reg = sum(r["registered"] for r in res[d]) / sum(r["frames"] for r in res[d])
            failed = sum(r["failed_chunks"] for r in res[d])
            pct = "" if d == "single" else f" ({100 * auc / single:.0f}%)"
            cells.append(f"{auc:.3f}{pct}, {100 * reg:.0f}% reg" + (f", {failed} failed" if failed else ""))
        rows.append(f"| {traj} | {seeds} | " + " | ".join(cells) + " |")
    head = "| trajectory | scenes | " + " | ".join(DESIGNS) + " |"
    return "\n".join([head, "|" + "---|" * (len(DESIGNS) + 2), *rows])


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5) and return that RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_rss() -> float:
    """Peak RSS in MB since the last reset."""
    return _status_mb("VmHWM")


def measure(folder: Path, max_frames: int, threads: int) -> dict[str, Any]:
    """Run one reconstruction in this process and return its time and memory (used by the ``cost`` section)."""
    from quantvggt.quant.load import load_model

    torch.set_num_threads(threads)
    model = load_model(MODEL, "cpu")
    scene_opts = ReconstructionOptions(max_frames=max_frames)
    with torch.no_grad():  # warm-up: first-call allocations and lazy initialisation are not the scene's cost
        model(torch.rand(2, 3, SIZE[1], SIZE[0]))
    base = _reset_peak_rss()  # loading the model peaks above what it keeps; measure the scene from here
    t0, c0 = time.perf_counter(), time.process_time()
    pred = reconstruct_scene(model, folder, scene_opts)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_rss()
    t = pred.report["timings_s"]
    arrays = [v for v in vars(pred).values() if isinstance(v, np.ndarray)]
    return {
        "seconds": seconds,
        "cpu_s": cpu,  # less sensitive than wall time to other jobs on a shared machine
        "output_mb": sum(a.nbytes for a in arrays) / 2**20,  # the returned prediction: every frame's maps
        "model_s": t["model"],
        "peak_mb": peak,
        "base_mb": base,
        "registered": len(pred.names),
        "chunks": (pred.report.get("chunking") or {}).get("chunks", 1),
    }


def cost_table(root: Path, sizes: list[int], chunk: int, threads: int, trajectory: str) -> str:
    """Time and peak RSS per scene size, one pass vs chunked, each in a fresh process."""
    rows = []
    out: dict[str, dict[int, dict]] = {"single": {}, "chunked": {}}
    for n in sizes:
        folder = scene(root, trajectory, n, 0)
        for kind, mf in (("single", n), ("chunked", chunk)):
            cmd = [sys.executable, __file__, "--measure", str(folder), "--max-frames", str(mf)]
            cmd += ["--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[kind][n] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  cost {n} {kind}: {out[kind][n]}", file=sys.stderr, flush=True)
    for n in sizes:
        s, c = out["single"][n], out["chunked"][n]
        grow = {k: v["peak_mb"] - v["base_mb"] for k, v in (("s", s), ("c", c))}
        rows.append(
            f"| {n} | {s['seconds']:.1f} / {s['cpu_s']:.1f} | {grow['s']:.0f} | {grow['s'] - s['output_mb']:.0f} | "
            f"{c['seconds']:.1f} / {c['cpu_s']:.1f} | {grow['c']:.0f} | {grow['c'] - c['output_mb']:.0f} | "
            f"{c['output_mb']:.0f} | "
            f"{c['chunks']} | {c['registered']}/{n} |"
        )
    lo, hi = sizes[0], sizes[-1]
    ratio = {k: out[k][hi]["seconds"] / out[k][lo]["seconds"] for k in out}
    cpu = {k: out[k][hi]["cpu_s"] / out[k][lo]["cpu_s"] for k in out}
    head = (
        "| frames | one pass s (wall / CPU) | one pass peak MB | one pass working MB | chunked s (wall / CPU) "
        "| chunked peak MB "
        "| chunked working MB | result MB | chunks | registered |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    return (
        f"{head}\n" + "\n".join(rows) + f"\n\n{hi} vs {lo} frames: one pass {ratio['single']:.2f}x the wall time "
        f"({cpu['single']:.2f}x the CPU time), chunked {ratio['chunked']:.2f}x ({cpu['chunked']:.2f}x)."
    )


def ray_table(root: Path, frames: int, chunk: int, workers: list[int], repeats: int, trajectory: str) -> str:
    """Wall time of one chunked scene on ``workers`` Ray workers (1 CPU, 1 thread each) vs in this process."""
    import ray

    from quantvggt.quant.load import load_model
    from quantvggt.reconstruct import main as reconstruct_main
    from workers.reconstruct import run_scenes

    folder = scene(root, trajectory, frames, 0)
    opts = ReconstructionOptions(max_frames=chunk, images="none", database=False, ply=False)
    model = load_model(MODEL, "cpu")
    local = []
    for r in range(repeats):
        t0 = time.perf_counter()
        res = reconstruct_main(model, folder, root / "ray-out" / f"local-{r}", opts)
        local.append(time.perf_counter() - t0)
        print(f"  ray: in-process {local[-1]:.1f} s, {res.images}/{frames} images", file=sys.stderr, flush=True)
    del model
    ray.init(address="local", num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    rows = [f"| in this process (1 thread) | {min(local):.1f} | {min(local):.1f} | | {res.images}/{frames} | |"]
    base = None
    try:
        for w in workers:
            runs, scene_s = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                [res] = run_scenes(
                    [str(folder)], MODEL, str(root / "ray-out" / f"w{w}"), opts, num_workers=w, force=True
                )
                runs.append(time.perf_counter() - t0)
                if not res.ok:
                    raise RuntimeError(res.error)
                report = json.loads((Path(res.output) / "report.json").read_text())
                scene_s.append(report["timings_s"]["total"])
                per = report["chunking"]["per_chunk"]
                spread = {c["worker"] for c in per}
                print(f"  ray {w} workers: run {runs[-1]:.1f} s, scene {scene_s[-1]:.1f} s, chunks on {len(spread)} "
                      f"workers, {res.images}/{frames} images", file=sys.stderr, flush=True)  # fmt: skip
            base = base or min(scene_s)
            rows.append(
                f"| Ray, {w} worker{'s' if w > 1 else ''} x 1 CPU | {min(runs):.1f} | {min(scene_s):.1f} | "
                f"{base / min(scene_s):.2f}x | {res.images}/{frames} | {len(per)} chunks on {len(spread)} workers |"
            )
    finally:
        ray.shutdown()
    head = (
        "| where | run s (actors started, model loaded) | scene s (plan to written) | speed-up (scene, vs 1 worker) "
        "| registered | chunks |\n|---|---|---|---|---|---|"
    )
    return f"{head}\n" + "\n".join(rows) + f"\n\n(best of {repeats} runs each)"


def main() -> None:
    """Run the selected sections and print Markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/large")
    ap.add_argument("--sections", default="accuracy,long,cost")
    ap.add_argument("--seeds", type=int, default=3, help="scenes per trajectory (accuracy)")
    ap.add_argument("--long-seeds", type=int, default=2, help="scenes per trajectory (long)")
    ap.add_argument("--chunk-size", type=int, default=32, help="max_frames of the chunked runs (= chunk size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trajectories", default="arc,orbit,walk,random", help="of the accuracy section")
    ap.add_argument("--ray-workers", default="1,2", help="ray section: worker counts to compare")
    ap.add_argument("--ray-frames", type=int, default=240, help="ray section: frames of the scene")
    ap.add_argument("--ray-repeats", type=int, default=2, help="ray section: runs per worker count (best kept)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--max-frames", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.max_frames, args.threads)))
        return
    from quantvggt.quant.load import load_model

    torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model = load_model(MODEL, "cpu")
    parts = [
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
        f"{args.threads} thread(s); chunk size {args.chunk_size} (overlap / anchors: a quarter)"
    ]
    sections = args.sections.split(",")
    if "accuracy" in sections:
        t = accuracy_table(model, root, 64, args.trajectories.split(","), args.seeds, args.chunk_size)
        parts.append(f"### 64 frames: AUC@30 (% of one pass), registered images\n\n{t}")
    if "long" in sections:
        t = accuracy_table(model, root, 240, ["orbit", "walk", "random"], args.long_seeds, args.chunk_size)
        parts.append(f"### 240 frames: AUC@30 (% of one pass), registered images\n\n{t}")
    if "cost" in sections:
        t = cost_table(root, [60, 120, 240], args.chunk_size, args.threads, "orbit")
        parts.append(f"### Time and peak memory per scene (orbit)\n\n{t}")
    if "ray" in sections:
        workers = [int(w) for w in args.ray_workers.split(",")]
        t = ray_table(root, args.ray_frames, args.chunk_size, workers, args.ray_repeats, "orbit")
        parts.append(f"### Chunks over Ray workers ({args.ray_frames}-frame orbit)\n\n{t}")
    text = "\n\n".join(parts) + "\n"
    (root / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""End-to-end batch throughput: S3 (moto server) -> download -> decode -> model -> COLMAP -> upload, in images/s.

    python benchmarks/throughput.py --out runs/throughput                       # the issue's sizes (200 scenes, 1000)
    python benchmarks/throughput.py --out runs/throughput --scenes 40 --large-frames 240 --workers 1,2

Both engines in the same run, on the same local Ray (``num_cpus`` = the largest worker count: 4 workers on a 2-core
machine are oversubscribed, and the table says so): the actor dispatcher (``workers.reconstruct.run_scenes``) and Ray
Data (``workers.data.run_scenes_data``). Workloads (synthetic 112x84 scenes, the shipped ``vggt-tiny-synthetic``):

- ``small``: ``--scenes`` scenes of ``--frames`` frames, each one forward pass;
- ``large``: one scene of ``--large-frames`` frames, chunked (``--chunk`` frames a pass) and merged.

Each run writes to its own prefix with ``force``; images/s counts the images of done scenes over the driver's wall
time (actors started and the model loaded included). The split sums each scene's report.json ``timings_s`` (decode =
``load``, ``model``, ``scan``, ``download``; ``wait``: behind the worker's other call's forward pass, with
``--in-flight`` 2; chunked: ``fetch``, ``align``, ``merge``) and export+upload (the result's seconds minus the
report's ``total``, which is stamped before the export), and sets the sum over workers (``wait`` left out) against the
wall time: ``busy`` near 1 means every worker worked all the time. Where the machine's cores went is measured, not
inferred: CPU seconds of the model workers, of this driver (which also serves the moto S3 server) and of everything
else (Ray's processes, worker start-up), sampled from /proc; and the S3 requests per scene (moto's access log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MODEL = "vggt-tiny-synthetic"
BUCKET = "bench"


def start_s3() -> Any:
    """A moto S3 server on 127.0.0.1 and the environment pointing at it (the workers inherit it)."""
    from moto.server import ThreadedMotoServer

    global REQUESTS
    REQUESTS = RequestCounter()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(QUANTVGGT_S3_ENDPOINT=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    import boto3

    boto3.client("s3", endpoint_url=os.environ["QUANTVGGT_S3_ENDPOINT"]).create_bucket(Bucket=BUCKET)
    return server


class RequestCounter(logging.Handler):
    """Counts the moto server's requests (its werkzeug access log, which this keeps off the console)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.addHandler(self)
        log.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


REQUESTS: RequestCounter | None = None


def upload(folder: Path, prefix: str) -> str:
    """Every file of ``folder`` under ``s3://bench/<prefix>/<folder name>/``; returns the scene URI."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["QUANTVGGT_S3_ENDPOINT"])
    for p in sorted(folder.iterdir()):
        if p.is_file():
            s3.upload_file(str(p), BUCKET, f"{prefix}/{folder.name}/{p.name}")
    return f"s3://{BUCKET}/{prefix}/{folder.name}"


def workloads(
    root: Path, names: list[str], scenes: int, frames: int, large: int, size: tuple[int, int]
) -> dict[str, list[str]]:
    """Render the named workloads' scenes once locally and upload them: workload name -> scene URIs."""
    from quantvggt import synth

    out: dict[str, list[str]] = {}
    if "small" in names:
        small = synth.main(
            root / f"small-{scenes}x{frames}-{size[0]}", scenes=scenes, frames=frames, seed=11, size=size
        )
        out["small"] = [upload(p, "small") for p in sorted(small.iterdir()) if p.is_dir()]
    if "large" in names:
        big = root / "large" / f"orbit_{large}_{size[0]}"
        if not big.exists():
            synth.make_scene(big, 12, large, size[0], size[1], "orbit")
        out["large"] = [upload(big, "large")]
    return out


def split(results: list[Any], out: str) -> dict[str, float]:
    """Seconds summed over scenes, per stage (report.json timings_s, and export+upload)."""
    from quantvggt.storage import open_storage

    storage, sums = open_storage(out), {}
    for r in results:
        if r.status != "done":
            continue
        t = json.loads(storage.read_bytes(f"{r.scene}/report.json"))["timings_s"]
        for k, v in t.items():
            if k != "total":
                sums[k] = sums.get(k, 0.0) + v
        sums["export+upload"] = sums.get("export+upload", 0.0) + max(0.0, r.seconds - t.get("total", r.seconds))
    return sums


class CpuMeter:
    """CPU seconds of every process on the machine while a batch runs, by role: the model workers (``ray::`` processes
    of our actor classes), this driver (the dispatcher and the moto server's threads) and the rest (raylet, GCS, Ray's
    agents, idle workers, anything else): where the cores went that the workers did not get.

    Sampled every ``period`` s (a process that exits loses at most its last period).
    """

    WORKERS = ("ReconstructionWorker", "_SceneStage", "_ChunkStage", "_ReduceStage", "MapWorker", "MapBatches")

    def __init__(self, period: float = 0.25) -> None:
        import psutil

        self.psutil, self.period, self.me = psutil, period, os.getpid()
        self.seen: dict[int, float] = {}
        self.others: dict[str, float] = {}  # "other" CPU seconds by program, for the results file
        self.sums = {"workers": 0.0, "driver+S3": 0.0, "other": 0.0}
        self._stop = threading.Event()
        self._sample()  # a process's CPU before the batch is not the batch's
        self.sums, self.others = dict.fromkeys(self.sums, 0.0), {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _role(self, proc: Any) -> str:
        if proc.pid == self.me:
            return "driver+S3"
        title = " ".join(proc.info.get("cmdline") or [])
        return "workers" if title.startswith("ray::") and any(w in title for w in self.WORKERS) else "other"

    def _sample(self) -> None:
        for proc in self.psutil.process_iter(["cmdline", "cpu_times"]):
            t = proc.info.get("cpu_times")
            if t is None:
                continue
            total, role = t.user + t.system, self._role(proc)
            delta = total - self.seen.get(proc.pid, 0.0)
            self.sums[role] += delta
            self.seen[proc.pid] = total
            if role == "other" and delta > 0:
                argv = [a.rsplit("/", 1)[-1] for a in proc.info.get("cmdline") or ["?"]]
                name = " ".join(argv[:2] if argv[0].startswith("python") else argv[:1])[:50] or "?"
                self.others[name] = self.others.get(name, 0.0) + delta

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds by role since the start."""
        self._stop.set()
        self._thread.join()
        self._sample()
        top = sorted(self.others.items(), key=lambda kv: -kv[1])[:6]
        return {**self.sums, "other_top": {k: round(v, 1) for k, v in top}}


def _forward_loop(scene: str, image_size: int | None, seconds: float, start: Any, out: Any) -> None:
    """One process, one torch thread (as a worker): forward passes over ``scene``'s frames until ``seconds`` pass."""
    import torch

    from quantvggt.images import load_and_preprocess
    from quantvggt.quant.load import load_model

    torch.set_num_threads(1)
    model = load_model(MODEL)
    paths = sorted(p for p in Path(scene).iterdir() if p.suffix == ".png")
    images = load_and_preprocess(paths, target_size=image_size or model.image_size).images
    with torch.no_grad():
        model(images)  # warm
        start.wait()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(images)
            n += 1
    out.put(n / (time.perf_counter() - t0))


def model_ceiling(scene: str, image_size: int | None, procs: list[int], seconds: float) -> dict[int, float]:
    """Forward passes/s of ``n`` worker-like processes at once, for each ``n``: the model alone, no I/O, no Ray, no
    S3 server: what 1 -> 2 workers could give on this machine at best (shared caches, memory and clocks included)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates: dict[int, float] = {}
    for n in procs:
        start, out = ctx.Barrier(n), ctx.Queue()
        ps = [ctx.Process(target=_forward_loop, args=(scene, image_size, seconds, start, out)) for _ in range(n)]
        for p in ps:
            p.start()
        rates[n] = sum(out.get() for _ in ps)
        for p in ps:
            p.join()
    return rates


def ceiling_line(args: argparse.Namespace, ceiling: dict[int, float]) -> str:
    """The model-alone result as one sentence."""
    return (
        f"The model alone ({args.frames} frames a pass at {args.image_size or 'its own'} px, 1 torch thread a process, "
        f"no I/O, no Ray, no S3 server), {args.ceiling:.0f} s each: 1 process {ceiling[1]:.3f} passes/s, 2 at once "
        f"{ceiling[2]:.3f} passes/s = **{ceiling[2] / ceiling[1]:.2f}x**: the most 1 -> 2 workers can give here"
    )


def run_one(engine: str, uris: list[str], workers: int, opts: Any, out: str, in_flight: int) -> dict[str, Any]:
    """One batch on one engine; images/s and the split."""
    from workers.data import run_scenes_data
    from workers.reconstruct import run_scenes

    meter, requests0 = CpuMeter(), REQUESTS.count if REQUESTS else 0
    t0 = time.perf_counter()
    if engine == "dispatcher":
        results = run_scenes(uris, MODEL, out, opts, num_workers=workers, force=True, in_flight=in_flight)
    else:
        results = run_scenes_data(uris, MODEL, out, opts, num_workers=workers, force=True, in_flight=in_flight)
    wall = time.perf_counter() - t0
    cpu_s = meter.stop()
    other_top = cpu_s.pop("other_top")
    requests = (REQUESTS.count if REQUESTS else 0) - requests0
    done = [r for r in results if r.status == "done"]
    images = sum(r.images for r in done)
    failed = [r.error for r in results if r.status != "done"]
    if failed:
        print(f"  {engine} x{workers}: {len(failed)} failed, e.g. {failed[0]}", file=sys.stderr)
    return {"wall": wall, "images": images, "ips": images / wall, "done": len(done), "n": len(results),
            "split": split(results, out), "cpu": cpu_s, "other_cpu_top": other_top,
            "s3_requests_per_scene": requests / max(1, len(results))}  # fmt: skip


def cpu() -> str:
    """The CPU model and the flags that matter here."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    wanted = sorted(f for f in flags if f.startswith(("amx", "avx512f", "avx512_bf16", "avx512_vnni")))
    return f"{name}, {os.cpu_count()} CPUs, flags: {' '.join(wanted) or 'none of amx/avx512'}"


def main() -> None:
    """Run every engine x worker count x workload; print markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/throughput"))
    ap.add_argument("--scenes", type=int, default=200, help="small workload: scenes")
    ap.add_argument("--frames", type=int, default=4, help="small workload: frames per scene")
    ap.add_argument("--large-frames", type=int, default=1000, help="large workload: frames of the one scene")
    ap.add_argument("--chunk", type=int, default=48, help="large workload: frames per forward pass (max_frames)")
    ap.add_argument("--workers", default="1,2,4", help="worker counts (1 CPU each)")
    ap.add_argument("--engines", default="dispatcher,data")
    ap.add_argument("--in-flight", default="2", help="calls per worker (1: no overlap), e.g. 1,2")
    ap.add_argument("--side", type=int, default=112, help="synthetic image width (height 3/4 of it)")
    ap.add_argument(
        "--image-size", type=int, default=None, help="model input width (ReconstructionOptions.image_size): more "
        "tokens per image make the model dominate; default the model's own")  # fmt: skip
    ap.add_argument("--workloads", default="small,large")
    ap.add_argument(
        "--ceiling", type=float, default=60.0, help="seconds of the model-alone run (1 and 2 processes) before the "
        "batches, on the small workload's first scene; 0: skip")  # fmt: skip
    ap.add_argument("--ceiling-only", action="store_true", help="measure the model alone, then stop (no batches)")
    args = ap.parse_args()

    import ray

    from quantvggt.options import ReconstructionOptions

    logging.basicConfig(level=logging.WARNING)
    workers = [int(w) for w in args.workers.split(",")]
    server = start_s3()
    uris = workloads(
        args.out,
        args.workloads.split(","),
        args.scenes,
        args.frames,
        args.large_frames,
        (args.side, args.side * 3 // 4),
    )
    common = {"max_points": 2000, "database": False, "image_size": args.image_size}
    opts = {
        "small": ReconstructionOptions(**common),
        "large": ReconstructionOptions(max_frames=args.chunk, overlap=4, **common),
    }
    depths = [int(d) for d in args.in_flight.split(",")]
    ceiling: dict[int, float] = {}
    if args.ceiling and "small" in uris:
        rendered = args.out / f"small-{args.scenes}x{args.frames}-{args.side}"
        first = next(p for p in sorted(rendered.iterdir()) if p.is_dir())
        ceiling = model_ceiling(str(first), args.image_size, [1, 2], args.ceiling)
        print(f"  model alone: {ceiling}", file=sys.stderr, flush=True)
    if args.ceiling_only:
        server.stop()
        print(f"CPU: {cpu()}\n\n{ceiling_line(args, ceiling)}")
        return
    ray.init(address="local", num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    try:
        for wl in args.workloads.split(","):
            for w in workers:
                for engine in args.engines.split(","):
                    for d in depths:
                        out = f"s3://{BUCKET}/out/{wl}-{engine}-{w}-{d}"
                        r = run_one(engine, uris[wl], w, opts[wl], out, d)
                        rows.append({"workload": wl, "engine": engine, "workers": w, "in_flight": d, **r})
                        print(f"  {wl} {engine} x{w} in flight {d}: {r['images']} images in {r['wall']:.1f} s = "
                              f"{r['ips']:.2f} img/s; CPU s {r['cpu']}, other: {r['other_cpu_top']}",
                              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        server.stop()
    print(f"CPU: {cpu()}; Ray num_cpus={max(workers)} (worker counts over {os.cpu_count()} are oversubscribed)\n")
    print(
        f"small = {args.scenes} scenes x {args.frames} frames; large = 1 scene x {args.large_frames} frames, "
        f"chunks of {args.chunk}; images {args.side} px wide, model input {args.image_size or 'default'}\n"
    )
    print(
        "| workload | engine | in flight | workers | scenes done | images | wall s | images/s | vs 1 worker | stage "
        "split (s summed over scenes) | busy = stage sum (no wait) / (workers x wall) | CPU s: workers / driver+S3 / "
        "other (cores used) | S3 requests per scene |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["workload"], r["engine"], r["in_flight"])
        base = next(b for b in rows if (b["workload"], b["engine"], b["in_flight"]) == key)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["split"].items(), key=lambda kv: -kv[1]))
        busy = sum(v for k, v in r["split"].items() if k != "wait") / (r["workers"] * r["wall"])
        over = " (oversubscribed)" if r["workers"] > (os.cpu_count() or 1) else ""
        ratio = r["ips"] / base["ips"]
        c = r["cpu"]
        cores = f"{c['workers']:.0f} / {c['driver+S3']:.0f} / {c['other']:.0f} ({sum(c.values()) / r['wall']:.2f})"
        print(f"| {r['workload']} | {r['engine']} | {r['in_flight']} | {r['workers']}{over} | {r['done']}/{r['n']} | "
              f"{r['images']} | {r['wall']:.1f} | {r['ips']:.2f} | {ratio:.2f}x | {stages} | {busy:.2f} | {cores} | "
              f"{r['s3_requests_per_scene']:.0f} |")  # fmt: skip
    if ceiling:
        print(f"\n{ceiling_line(args, ceiling)}")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "model_alone_passes_per_s": ceiling}, indent=1))


if __name__ == "__main__":
    main()

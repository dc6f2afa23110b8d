"""Orchestration commands of the ``quantvggt`` console script (demo, submit, serve, status).

Registered under the ``quantvggt.commands`` entry-point group (see pyproject.toml). Prefect and Ray are imported
inside ``run`` only, so building the parser (``quantvggt --help``) stays fast and works without a Prefect server.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from quantvggt.cli import Command


def _demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--model", default="vggt-tiny-synthetic")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="block-reconstruction epochs")


def _demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults."""
    from flows.demo import main as demo_main

    demo_main(out=args.out, model=args.model, scenes=args.scenes, workers=args.workers, epochs=args.epochs)
    return 0


def _submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenes", nargs="+")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)


def _submit(args: argparse.Namespace) -> int:
    """Queue a run of the ``reconstruct`` deployment (needs a Prefect server and `quantvggt serve` or a worker)."""
    from prefect.deployments import run_deployment

    params = {"scenes": args.scenes, "checkpoint": args.checkpoint, "out": args.out, "num_workers": args.workers}
    run = run_deployment(name="reconstruct/reconstruct", parameters=params, timeout=0)
    print(f"queued flow run {run.name} ({run.id}) of reconstruct/reconstruct")
    return 0


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inbox", required=True, help="prefix scanned nightly for new scene folders")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)


def _serve(args: argparse.Namespace) -> int:
    """Serve the deployments (reconstruct on demand, nightly at 02:00, quantize manual) and run queued work."""
    from prefect import serve

    from flows.quantize import quantize
    from flows.reconstruct import reconstruct, reconstruct_nightly

    nightly_params = {"inbox": args.inbox, "checkpoint": args.checkpoint, "out": args.out}
    serve(
        quantize.to_deployment(name="quantize"),
        reconstruct.to_deployment(name="reconstruct"),
        reconstruct_nightly.to_deployment(name="reconstruct-nightly", cron="0 2 * * *", parameters=nightly_params),
    )
    return 0


def _status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output root whose _manifests/ to show")
    parser.add_argument("--limit", type=int, default=5)


def _status(args: argparse.Namespace) -> int:
    """Recent reconstruct runs and the scene results of their manifests."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from quantvggt.pipeline import read_manifest
    from quantvggt.storage import open_storage

    async def runs() -> list:
        async with get_client() as client:
            return await client.read_flow_runs(limit=args.limit, sort=FlowRunSort.START_TIME_DESC)

    for r in asyncio.run(runs()):
        print(f"{r.start_time} {r.name:24s} {r.state_name:12s} {json.dumps(r.parameters)[:100]}")
    if args.out:
        store = open_storage(args.out)
        keys = sorted(k for k in store.list("_manifests/") if k.endswith(".parquet"))[-args.limit :]
        for k in keys:
            print(f"\n{store.uri(k)}")
            for result in read_manifest(store, k):
                print(f"  {result.summary()}")
    return 0


demo = Command(
    "demo",
    "main job: synthetic scenes -> quantize flow -> reconstruct flow (local Ray) -> COLMAP",
    _demo_options,
    _demo,
)
submit = Command("submit", "queue scene folders for the reconstruct deployment", _submit_options, _submit)
serve = Command(
    "serve", "serve the Prefect deployments and run queued work (needs PREFECT_API_URL)", _serve_options, _serve
)
status = Command("status", "recent runs and their manifest rows", _status_options, _status)

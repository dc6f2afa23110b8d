"""The ``quantvggt`` console script: the library commands plus the orchestration ones (demo, submit, serve, status)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from quantvggt import cli as lib_cli


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults."""
    from flows.demo import main as demo_main

    demo_main(out=args.out, model=args.model, scenes=args.scenes, workers=args.workers, epochs=args.epochs)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Queue a run of the ``reconstruct`` deployment (needs a Prefect server and `quantvggt serve` or a worker)."""
    from prefect.deployments import run_deployment

    params = {"scenes": args.scenes, "checkpoint": args.checkpoint, "out": args.out, "num_workers": args.workers}
    run = run_deployment(name="reconstruct/reconstruct", parameters=params, timeout=0)
    print(f"queued flow run {run.name} ({run.id}) of reconstruct/reconstruct")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
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


def cmd_status(args: argparse.Namespace) -> int:
    """Recent reconstruct runs and the rows of their manifests."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async def runs() -> list:
        async with get_client() as client:
            return await client.read_flow_runs(limit=args.limit, sort=FlowRunSort.START_TIME_DESC)

    for r in asyncio.run(runs()):
        print(f"{r.start_time} {r.name:24s} {r.state_name:12s} {json.dumps(r.parameters)[:100]}")
    if args.out:
        import pyarrow.parquet as pq

        from quantvggt.storage import open_storage

        store = open_storage(args.out)
        keys = sorted(k for k in store.list("_manifests/") if k.endswith(".parquet"))[-args.limit :]
        for k in keys:
            print(f"\n{store.uri(k)}")
            import io

            for row in pq.read_table(io.BytesIO(store.read_bytes(k))).to_pylist():
                print(
                    f"  {row['scene']:20s} {row['status']:8s} images={row['images']} points={row['points']} {row['seconds']:.1f}s {row['error'] or ''}"
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Library parser plus orchestration subcommands."""
    p = lib_cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    s = sub.add_parser(
        "demo", help="main job: synthetic scenes -> quantize flow -> reconstruct flow (local Ray) -> COLMAP"
    )
    s.add_argument("--out", default="demo-out")
    s.add_argument("--model", default="vggt-tiny-synthetic")
    s.add_argument("--scenes", type=int, default=3)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--epochs", type=int, default=5, help="block-reconstruction epochs")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("submit", help="queue scene folders for the reconstruct deployment")
    s.add_argument("scenes", nargs="+")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=cmd_submit)
    s = sub.add_parser("serve", help="serve the Prefect deployments and run queued work (needs PREFECT_API_URL)")
    s.add_argument("--inbox", required=True, help="prefix scanned nightly for new scene folders")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("status", help="recent runs and their manifest rows")
    s.add_argument("--out", help="output root whose _manifests/ to show")
    s.add_argument("--limit", type=int, default=5)
    s.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quantvggt`` console script."""
    return lib_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())

"""Orchestration commands of the ``quantvggt`` console script (demo, submit, serve, status).

Registered under the ``quantvggt.commands`` entry-point group (see pyproject.toml). Prefect and Ray are imported
inside ``run`` only, so building the parser (``quantvggt --help``) stays fast and works without a Prefect server.
Every check a user can fail (no Prefect server, a wrong bucket, no checkpoint yet) is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from quantvggt.cli import Command

DEPLOYMENTS = ("quantize/quantize", "reconstruct/reconstruct", "reconstruct-nightly/reconstruct-nightly")
MANAGED_TAG = "quantvggt-serve"  # marks the deployments `quantvggt serve` created (and may therefore replace)


class PrefectUnavailableError(RuntimeError):
    """No Prefect server is configured or reachable."""


def _quiet() -> None:
    # botocore logs each credential and endpoint lookup at INFO: noise between a command's own lines
    logging.getLogger("botocore").setLevel(logging.WARNING)


def _api_url() -> str:
    """The configured Prefect API; without one a command would silently use a throw-away local API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PrefectUnavailableError(
            "no Prefect server configured: export PREFECT_API_URL=http://127.0.0.1:4200/api "
            "(infra/start-local.sh writes it to infra/local.env) or your server's URL"
        )
    return str(url)


@contextlib.contextmanager
def _server(url: str) -> Iterator[None]:
    """An unreachable Prefect server is one line, not an httpx traceback."""
    import httpx

    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise PrefectUnavailableError(f"cannot reach the Prefect server at {url}: {e}") from e


def _ui_link(flow_run_id: Any) -> str:
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui}/runs/flow-run/{flow_run_id}" if ui else str(flow_run_id)


def _demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--model", default="vggt-tiny-synthetic")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="block-reconstruction epochs")


def _demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults."""
    from flows.demo import main as demo_main
    from quantvggt.model.loading import resolve_source

    for name in ("scenes", "workers", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    resolve_source(args.model)  # a model that is not there fails in one line, before any flow runs
    demo_main(out=args.out, model=args.model, scenes=args.scenes, workers=args.workers, epochs=args.epochs)
    return 0


def _submit_options(parser: argparse.ArgumentParser) -> None:
    from quantvggt.options import BatchOptions, ReconstructionOptions, add_arguments

    parser.add_argument("scenes", nargs="+", help="scene folders, or prefixes holding scene folders (s3:// or local)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint URI, or STORE/quantized/latest")
    parser.add_argument("--out", required=True, help="output root (s3://bucket/reconstructions)")
    parser.add_argument("--deployment", default="reconstruct/reconstruct")
    parser.add_argument(
        "--wait", action="store_true", help="follow the run to its end; exit 1 (with the reason) if it fails"
    )
    # only what is given is sent: the rest keeps the deployment's own values (prefect.yaml), else the defaults
    add_arguments(parser, BatchOptions, "the run (Ray workers, collisions, failures)", defaults=False)
    add_arguments(parser, ReconstructionOptions, "each scene (large scenes go in chunks on Ray)", defaults=False)


def _submit(args: argparse.Namespace) -> int:
    """Check the inputs, then queue a run of the ``reconstruct`` deployment (served, or a worker of its pool)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from flows.params import check_scene_inputs, check_storage_root, resolve_checkpoint
    from quantvggt.batch import name_outputs
    from quantvggt.options import BatchOptions, ReconstructionOptions, given
    from quantvggt.storage import expand_scene_uris

    _quiet()
    options, batch = given(ReconstructionOptions, args), given(BatchOptions, args)
    ReconstructionOptions(**options)  # a bad value fails here in one line, not in a worker later
    run_opts = BatchOptions(**batch)
    url = _api_url()
    check_scene_inputs(args.scenes)  # wrong bucket or prefix: fail here, not in a worker an hour later
    check_storage_root(args.out)
    resolve_checkpoint(args.checkpoint)
    # name collisions (two inputs, or another source's result under the name): refused before anything is queued
    _, decided = name_outputs(expand_scene_uris(args.scenes), args.out, run_opts.on_collision, run_opts.force)
    refused = [r for r in decided if not r.ok]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ValueError(f"{refused[0].scene}: {refused[0].error.removeprefix('ValueError: ')}{more}")
    params: dict[str, Any] = {"scenes": args.scenes, "checkpoint": args.checkpoint, "out": args.out}
    if options:
        params["options"] = options
    if batch:
        params["batch"] = batch
    try:
        with _server(url):
            run = run_deployment(name=args.deployment, parameters=params, timeout=0)
            print(f"queued flow run {run.name} of {args.deployment}: {_ui_link(run.id)}", flush=True)
            if args.wait:
                return _follow(run.id)
    except ObjectNotFound as e:
        raise PrefectUnavailableError(
            f"deployment {args.deployment} not found at {url}: register it with `prefect deploy --all` "
            "(infra/README.md) or run `quantvggt serve`"
        ) from e
    return 0


def _follow(run_id: Any, poll_s: float = 5.0) -> int:
    """Wait for a flow run to end; print its final state in one line; 0 if it completed, else 1."""
    import time

    from prefect.client.orchestration import get_client

    from flows.report import one_line

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(poll_s)
    message = (run.state.message or "").removeprefix("Flow run encountered an exception: ")
    print(f"flow run {run.name}: {run.state_name}" + (f": {one_line(message, 400)}" if message else ""))
    return 0 if run.state.is_completed() else 1


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inbox", required=True, help="prefix scanned nightly for new scene folders")
    parser.add_argument("--checkpoint", required=True, help="checkpoint URI, or STORE/quantized/latest")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--name-suffix", default="", help="serve as <name>-<suffix>, beside the deployments `prefect deploy` made"
    )
    parser.add_argument("--cron", default="0 2 * * *", help="schedule of the nightly run (UTC)")


def _serve(args: argparse.Namespace) -> int:
    """Serve quantize (manual), reconstruct (on demand) and reconstruct-nightly, and run their queued work here."""
    from prefect import serve

    from flows.params import ParameterError, check_inbox, check_storage_root, resolve_checkpoint
    from flows.quantize import quantize
    from flows.reconstruct import reconstruct, reconstruct_nightly

    _quiet()
    url = _api_url()
    check_inbox(args.inbox)
    check_storage_root(args.out)
    try:
        resolve_checkpoint(args.checkpoint)
    except ParameterError as e:  # ".../latest" before the first quantize run: nightly runs fail until then
        if not args.checkpoint.rstrip("/").endswith("/latest"):
            raise
        logging.getLogger(__name__).warning("%s", e)
    suffix = f"-{args.name_suffix}" if args.name_suffix else ""
    names = [d.split("/")[1] + suffix for d in DEPLOYMENTS]
    with _server(url):
        asyncio.run(_refuse_foreign([f"{d.split('/')[0]}/{n}" for d, n in zip(DEPLOYMENTS, names)]))
    nightly = {"inbox": args.inbox, "checkpoint": args.checkpoint, "out": args.out}
    tags = [MANAGED_TAG]
    serve(
        quantize.to_deployment(name=names[0], tags=tags),
        reconstruct.to_deployment(name=names[1], tags=tags),
        reconstruct_nightly.to_deployment(name=names[2], cron=args.cron, parameters=nightly, tags=tags),
    )
    return 0


async def _refuse_foreign(full_names: list[str]) -> None:
    """Refuse to replace a deployment that `quantvggt serve` did not create (e.g. `prefect deploy`'s)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        for name in full_names:
            try:
                d = await client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if MANAGED_TAG not in (d.tags or []):
                pool = f" (work pool {d.work_pool_name}: run `prefect worker start --pool {d.work_pool_name}`)"
                raise RuntimeError(
                    f"deployment {name} exists and was not made by `quantvggt serve`{pool if d.work_pool_name else ''}"
                    "; serving would replace it: pass --name-suffix served to serve beside it "
                    "(and submit with --deployment reconstruct/reconstruct-served)"
                )


def _status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output root whose _manifests/ to show")
    parser.add_argument("--limit", type=int, default=5)


async def _runs(limit: int) -> tuple[list[Any], list[Any], dict[Any, str], dict[Any, str]]:
    """(recent started runs, newest first; next scheduled runs; flow names by id; persisted results by run id)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType as StateType
    from prefect.client.schemas.objects import StateType as T
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        started = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
        scheduled = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=StateType(any_=[T.SCHEDULED, T.PENDING]))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=3,
        )
        flows = {r.flow_id for r in started + scheduled}
        names = {f: (await client.read_flow(f)).name for f in flows}
        results = {r.id: await _result(r) for r in started}  # e.g. the quantize flow's checkpoint URI
    return started, scheduled, names, results


async def _result(run: Any) -> str:
    if run.state is None or not run.state.is_completed():
        return ""
    try:
        value = await run.state.aresult(raise_on_failure=False)
    except Exception:  # results kept on another machine, or not persisted
        return ""
    return value if isinstance(value, str) else ""


def _when(t: Any) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _status(args: argparse.Namespace) -> int:
    """Recent runs (newest first, then the next scheduled) and the scene rows of the newest manifests."""
    from flows.report import one_line
    from quantvggt.manifest import read_manifest
    from quantvggt.storage import open_storage

    _quiet()
    url = _api_url()
    with _server(url):
        started, scheduled, names, results = asyncio.run(_runs(args.limit))
    print(f"recent runs ({url}):" if started else f"no runs yet ({url})")
    for r in started:
        state = r.state_name or "?"
        message = (r.state.message or "").removeprefix("Flow run encountered an exception: ") if r.state else ""
        why = one_line(message, 160) if r.state and r.state.is_failed() else ""
        result = results.get(r.id, "")
        extra = why or (f"-> {result}" if result else json.dumps(r.parameters)[:100])
        print(f"  {_when(r.start_time)}  {names.get(r.flow_id, '?'):20s} {r.name:24s} {state:10s} {extra}")
    for r in scheduled:
        print(f"  next: {_when(r.expected_start_time)}  {names.get(r.flow_id, '?'):20s} {r.name:24s} {r.state_name}")
    if args.out:
        store = open_storage(args.out)
        keys = sorted(k for k in store.list("_manifests/") if k.endswith(".parquet"))[-args.limit :]
        if not keys:
            print(f"\nno manifests in {store.uri('_manifests/')}")
        for k in keys:
            print(f"\n{store.uri(k)}")
            for result in read_manifest(store, k):
                print(
                    f"  {result.scene:24s} {result.status:8s} images={result.images} points={result.points} "
                    f"{result.seconds:.1f}s {one_line(result.error, 160)}".rstrip()
                )
    return 0


demo = Command(
    "demo",
    "main job: synthetic scenes -> quantize flow -> reconstruct flow (local Ray) -> COLMAP",
    _demo_options,
    _demo,
)
submit = Command(
    "submit", "queue scene folders for the reconstruct deployment (checked first)", _submit_options, _submit
)
serve = Command(
    "serve", "serve the Prefect deployments and run queued work (needs PREFECT_API_URL)", _serve_options, _serve
)
status = Command("status", "recent runs and their manifest rows", _status_options, _status)

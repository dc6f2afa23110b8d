"""The documented local stack, as a user drives it (infra/README.md), end to end.

moto S3 server; a Prefect server (the test harness's); a Ray cluster started *before* the S3 variables exist in its
environment (as ``infra/start-local.sh`` used to start it); ``prefect deploy --all`` from prefect.yaml (refused
while QUANTVGGT_STORE is unset); ``quantvggt submit``; a process worker executing the runs; a nightly run.
Checked: a failing scene fails the run and its artifact carries the full error; a different source with the same
folder name is not skipped; setup errors are not retried; the library's log lines reach the run's logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from quantvggt.storage import open_storage

REPO = Path(__file__).resolve().parents[2]
BUCKET = "stack"
STORE = f"s3://{BUCKET}"
OUT = f"{STORE}/reconstructions"
S3_VARS = ("QUANTVGGT_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def store(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Bucket: x/scene_000 and y/scene_000 (same name, different sources), inbox/ with a broken and a new scene."""
    from quantvggt import synth
    from quantvggt.quant import get_recipe, quantize_, save_quantized
    from tests.conftest import sane_tiny_model

    tmp = tmp_path_factory.mktemp("stack")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    st = open_storage(STORE)
    scenes = synth.main(tmp / "scenes", scenes=3, frames=4, seed=3, size=(112, 84))
    for src, dest in (("scene_000", "x/scene_000"), ("scene_001", "y/scene_000"), ("scene_002", "inbox/scene_new")):
        for p in sorted((scenes / src).glob("*.png")):
            st.upload(p, f"{dest}/{p.name}")
    st.write_bytes("inbox/scene_broken/corrupt.png", (scenes / "scene_000" / "frame_000.png").read_bytes()[:64])
    st.write_bytes("inbox/scene_broken/empty.jpg", b"")
    model = sane_tiny_model()
    model.config.image_size = 112
    quantize_(model, get_recipe("quarot-w4a4"))
    st.upload_dir(save_quantized(model, tmp / "ckpt"), "quantized/tiny-w4a4")
    return STORE


@pytest.fixture(scope="module")
def ray_address(s3_endpoint: str) -> Any:
    """A local Ray cluster whose processes never saw the S3 variables; its address for other processes."""
    import ray

    saved = {k: os.environ.pop(k) for k in S3_VARS if k in os.environ}
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    finally:
        os.environ.update(saved)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def prefect_api() -> Any:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a loaded machine starts it slowly
        yield PREFECT_API_URL.value()


def _env(prefect_api: str, ray_address: str, home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RAY_ADDRESS": ray_address, "PREFECT_HOME": str(home)}
    env.pop("QUANTVGGT_STORE", None)
    return {**env, **extra}


def _prefect(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("prefect")), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _worker_once(env: dict[str, str]) -> str:
    """A process worker of the work pool, polling once: runs every run queued so far, as `prefect worker start`."""
    # --limit: with a limit, a run-once worker waits for the runs it started
    done = _prefect(["worker", "start", "--pool", "quantvggt-local", "--run-once", "--limit", "4"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _submit(*args: str) -> int:
    from quantvggt.cli import main

    return main(["submit", *args, "--checkpoint", f"{STORE}/quantized/latest", "--out", OUT, "--workers", "1"])


def _last_run_id(capsys: pytest.CaptureFixture) -> str:
    out = capsys.readouterr().out
    assert "queued flow run" in out, out
    return out.strip().rsplit("/", 1)[-1]


def _run(client: Any, run_id: str) -> Any:
    return client.read_flow_run(run_id)


def _artifacts(client: Any, run_id: str) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found}


def test_actors_get_storage_config_and_setup_errors_fail_fast(store: str, ray_address: str) -> None:
    from workers.reconstruct import run_scenes

    # the cluster's processes have no S3 variables: only the actors' runtime_env lets them reach moto
    [ok] = run_scenes([f"{store}/x/scene_000"], f"{store}/quantized/tiny-w4a4", f"{store}/probe", num_workers=1)
    assert ok.status == "done", ok.error
    t0 = time.monotonic()
    results = run_scenes(
        [f"{store}/x/scene_000", f"{store}/y/scene_000"], f"{store}/quantized/missing", f"{store}/probe2"
    )
    assert [r.status for r in results] == ["failed", "failed"]
    assert all(r.error.startswith("worker setup failed: ") and r.attempt == 0 for r in results), results
    assert "quantized/missing" in results[0].error and "\n" not in results[0].error
    assert time.monotonic() - t0 < 120  # not retried three times per scene


def test_documented_stack_end_to_end(
    store: str, prefect_api: str, ray_address: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    from flows.params import record_latest

    env = _env(prefect_api, ray_address, tmp_path / "prefect-home", QUANTVGGT_REPO=str(REPO))
    client = get_client(sync_client=True)
    client.__enter__()
    client.create_work_pool(WorkPoolCreate(name="quantvggt-local", type="process"))

    # deploy: refused while QUANTVGGT_STORE is unset, then registered from prefect.yaml
    refused = _prefect(["--no-prompt", "deploy", "--all"], env)
    assert refused.returncode != 0 and "set QUANTVGGT_STORE before `prefect deploy`" in refused.stdout + refused.stderr
    deployed = _prefect(["--no-prompt", "deploy", "--all"], {**env, "QUANTVGGT_STORE": store})
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    nightly = client.read_deployment_by_name("reconstruct-nightly/reconstruct-nightly")
    nested = {  # prefect.yaml: the options objects, nested (quantvggt.options)
        "options": {"max_frames": 32, "chunking": "sequential", "memory_budget_mb": None},
        "batch": {"num_workers": 2, "cpus_per_worker": 1, "in_flight": 2, "allowed_failures": 0},
    }
    expected = {"inbox": f"{store}/inbox", "checkpoint": f"{store}/quantized/latest", "out": OUT, **nested}
    assert nightly.parameters == expected
    assert nightly.work_pool_name == "quantvggt-local"

    # before any quantize run, submit says so; a wrong bucket is refused before anything is queued
    assert _submit(f"{store}/x/scene_000") == 2
    assert "run the quantize flow first" in capsys.readouterr().err
    record_latest(f"{store}/quantized", f"{store}/quantized/tiny-w4a4", {"recipe": "quarot-w4a4"})  # as quantize does
    assert _submit("s3://no-such-bucket/x/scene_000") == 2
    wrong = "quantvggt submit: error: s3://no-such-bucket/x/scene_000: bucket does not exist"
    assert capsys.readouterr().err.strip() == wrong

    # run A: a good and a broken scene -> Failed, with the full error in the artifacts
    assert _submit(f"{store}/x/scene_000", f"{store}/inbox/scene_broken") == 0
    run_a = _last_run_id(capsys)
    _worker_once(env)
    a = _run(client, run_a)
    assert a.state.is_failed() and "1 of 2 scenes failed (scene_broken)" in a.state.message
    arts = _artifacts(client, run_a)
    assert {"reconstruct-summary", "reconstruct-scenes", "reconstruct-manifest", "reconstruct-progress"} <= set(arts)
    rows = {r["scene"]: r for r in _table(arts["reconstruct-scenes"])}
    full = rows["scene_broken"]["error"]
    assert full.startswith("SceneError: s3://stack/inbox/scene_broken: needs at least 2 usable images"), full
    summary = arts["reconstruct-summary"].data
    assert full.replace("|", "\\|") in summary and "\x1b" not in summary
    assert "data:image/png;base64," in summary  # scene_000's preview
    assert rows["scene_000"]["status"] == "done" and float(arts["reconstruct-progress"].data) == 100.0
    st = open_storage(OUT)
    record = st.completion_record("scene_000")
    assert record["source"] == f"{store}/x/scene_000" and record["checkpoint"] == f"{store}/quantized/tiny-w4a4"
    assert record["options"]["max_points"] and "preview.png" in record["files"]
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_a])))
    assert any(log.name == "workers.reconstruct" and "scene_000 done" in log.message for log in logs)

    # y/scene_000 has the same folder name as x/scene_000: refused before queueing (never skipped), or run C suffixed
    assert _submit(f"{store}/y/scene_000") == 2
    refused = capsys.readouterr().err
    assert (
        "holds the result of another scene folder with the same name" in refused and "--on-collision suffix" in refused
    )
    assert _submit(f"{store}/y/scene_000", "--on-collision", "suffix") == 0
    run_c = _last_run_id(capsys)
    # run D: the nightly deployment (scheduled at 02:00; started now): a new scene in the inbox and the broken one
    run_d = run_deployment("reconstruct-nightly/reconstruct-nightly", timeout=0).id
    _worker_once(env)
    c = _run(client, run_c)
    assert c.state.is_completed(), c.state.message
    [suffixed] = _table(_artifacts(client, run_c)["reconstruct-scenes"])
    assert suffixed["status"] == "done" and suffixed["scene"].startswith("scene_000-")
    assert st.completion_record(suffixed["scene"])["source"] == f"{store}/y/scene_000"
    assert st.completion_record("scene_000")["source"] == f"{store}/x/scene_000"  # x's result untouched
    d = _run(client, run_d)
    assert d.state.is_failed() and "scene_broken" in d.state.message
    [sub] = client.read_flow_runs(flow_run_filter=_children(run_d))
    nightly_rows = {r["scene"]: r["status"] for r in _table(_artifacts(client, sub.id)["reconstruct-scenes"])}
    assert nightly_rows == {"scene_broken": "failed", "scene_new": "done"}

    # status: newest first, no scheduled run listed as started, errors on one line
    from quantvggt.cli import main

    assert main(["status", "--out", OUT, "--limit", "8"]) == 0
    out = capsys.readouterr().out
    starts = [line.split()[0] + " " + line.split()[1] for line in out.splitlines() if line.startswith("  20")]
    assert len(starts) == 4 and starts == sorted(starts, reverse=True), out  # A, C, D and D's subflow
    assert "None" not in out and "reconstruct-nightly" in out and "ScenesFailedError: 1 of 2" in out, out
    assert all(len(line) < 400 for line in out.splitlines()), out
    client.__exit__(None, None, None)


def _table(artifact: Any) -> list[dict[str, Any]]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def _children(run_id: Any) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))


def test_run_writes_what_it_can_when_storage_fails(
    store: str, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad checkpoint, an unlistable input and an output store that fails mid-run: every scene still has a row."""
    import flows.reconstruct as rec
    from quantvggt.manifest import read_manifest
    from quantvggt.storage import StorageError

    monkeypatch.setenv("QUANTVGGT_CACHE", str(tmp_path / "cache"))
    real = rec.write_manifest

    def output_store_down(results: list, storage: Any, key: str) -> str:
        if storage.uri().startswith("s3://"):
            raise StorageError(f"put {storage.uri(key)}: S3 error InternalError (HTTP 500): simulated outage")
        return real(results, storage, key)

    monkeypatch.setattr(rec, "write_manifest", output_store_down)
    scene = tmp_path / "scene_a"
    scene.mkdir()
    with pytest.raises(rec.ScenesFailedError) as err:
        rec.reconstruct(
            scenes=[str(scene), "s3://no-such-bucket-q/inbox"], checkpoint=f"{store}/quantized/missing", out=OUT
        )
    msg = str(err.value)
    assert "2 of 2 scenes failed" in msg and "manifest not written to the output" in msg and "\n" not in msg
    manifest = Path(err.value.manifest)
    assert manifest.is_relative_to(tmp_path / "cache" / "manifests")
    rows = {r.scene: r for r in read_manifest(open_storage(manifest.parent), manifest.name)}
    assert rows["scene_a"].error.startswith("checkpoint unusable: checkpoint s3://stack/quantized/missing: no model")
    assert rows["inbox"].error.endswith("s3://no-such-bucket-q/inbox: bucket does not exist")

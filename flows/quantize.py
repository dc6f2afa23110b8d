"""Quantize flow: statistics fan-out (tasks) -> NFDS selection -> calibration -> stored checkpoint, once per inputs.

The inputs hash (weights, pool contents, recipe, seed, version) is the Prefect cache key of the ``quantize-model``
task, so a rerun shows it as **Cached**; the stored checkpoint stays the truth: a hash whose checkpoint is gone from
the store is computed again (``refresh_cache``). The flow's result (the checkpoint URI) is persisted, every run
records it as ``<out>/quantized/latest.json`` (what ``<out>/quantized/latest`` means to the reconstruct flows), and a
``quantized-checkpoint`` artifact shows its URI, size and the calibration plot.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS
from prefect.futures import as_completed

import quantvggt
from flows import route_library_logs
from flows.params import record_latest, require
from flows.report import browse_url
from quantvggt.calib import nfds
from quantvggt.model.loading import resolve_source
from quantvggt.quant.load import load_model
from quantvggt.storage import Storage, fetch_scene, find_scenes, is_remote, open_storage, sha256_file

route_library_logs()


_MODEL_LOCK = threading.Lock()


def _shared_model(source: str) -> Any:
    # statistics tasks run in threads of the flow process and share one read-only model, loaded once
    with _MODEL_LOCK:
        return _load_once(source)


@functools.lru_cache(maxsize=2)
def _load_once(source: str) -> Any:
    return load_model(source, device="cpu")


def _local_pool(pool: list[str], work: Path) -> list[Path]:
    """Pool entries as local folders (``s3://`` pools are fetched scene by scene)."""
    out = []
    for i, item in enumerate(pool):
        if is_remote(item):
            st = open_storage(item)
            for s in find_scenes(st):
                out.append(fetch_scene(st, s, work / f"pool{i}" / s))
        else:
            out.append(Path(item))
    return out


def inputs_hash(model: str, pool_dirs: list[Path], params: dict[str, Any]) -> str:
    """Hash of everything that determines the quantized checkpoint (weights, pool contents, recipe, seed, version)."""
    h = hashlib.sha256()
    try:
        weights, _ = resolve_source(model) if not is_remote(model) else (None, None)
        h.update((sha256_file(weights) if weights else model).encode())
    except Exception:  # unresolvable here (e.g. hub offline): fall back to the source string
        h.update(model.encode())
    for d in pool_dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(d)}:{p.stat().st_size}".encode())
    h.update(json.dumps({**params, "version": quantvggt.__version__}, sort_keys=True).encode())
    return h.hexdigest()[:16]


# the candidate names its frames by path and inputs_key covers the pool's contents: both together are the sample
@task(name="sample-stats", cache_policy=INPUTS, persist_result=True)
def stats_task(model: str, candidate: dict[str, Any], inputs_key: str) -> dict[str, Any]:
    """Deep-layer statistics of one calibration candidate (cached by its inputs: Cached on a rerun)."""
    m = _shared_model(model)
    c = nfds.Candidate(**{**candidate, "frames": tuple(candidate["frames"])})
    stats = nfds.sample_stats(m, nfds.load_candidate(c, m.image_size))
    return {"sample_id": c.sample_id, "scene": c.scene, "group": c.group, "frames": list(c.frames), **stats}


def _checkpoint_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"quantized-{hashlib.sha256(parameters['out'].encode()).hexdigest()[:8]}-{parameters['key']}"


@task(name="quantize-model", cache_key_fn=_checkpoint_key, persist_result=True)
def quantize_model(
    key: str,
    out: str,
    model: str,
    recipe: str,
    overrides: dict[str, Any],
    rows: list[dict[str, Any]] | None,
    details: dict[str, Any],
    progress: Any = None,
) -> str:
    """Select (NFDS), calibrate and store the checkpoint under ``out/<key>``; returns its URI (cached by ``key``)."""
    from quantvggt.quant import get_recipe, quantize_, save_quantized

    logger = get_run_logger()
    store = open_storage(out)
    if store.is_complete(key):  # a new Prefect database, an old store: nothing to compute
        return store.uri(key)
    if rows is None:
        raise RuntimeError(f"{store.uri(key)}: not stored and no calibration statistics given")
    with tempfile.TemporaryDirectory(prefix="quantvggt-quantize-") as tmp:
        work = Path(tmp)
        selected = nfds.select(rows, details["clusters"], details["per_cluster"], details["seed"])
        manifest = nfds.write_manifest(selected, work / "ckpt-extra" / "calibration.parquet")
        nfds.plot_selection(selected, manifest.with_suffix(".png"))
        n_sel = sum(r["selected"] for r in selected)
        logger.info("NFDS: %d selected, %d filtered of %d", n_sel, sum(r["outlier"] for r in selected), len(selected))
        _progress(progress, 55, f"calibrating {recipe} on {n_sel} samples (the long step)")
        m = load_model(model, device="cpu")
        report = quantize_(m, get_recipe(recipe, **overrides), nfds.load_selected(manifest, image_size=m.image_size))
        inputs = {"model": model, **details}
        ckpt = save_quantized(m, work / "ckpt", extra={"report": report.to_dict(), "inputs": inputs})
        for f in (manifest, manifest.with_suffix(".png")):
            f.replace(ckpt / f.name)
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        _progress(progress, 90, f"uploading {size / 1e6:.1f} MB to {store.uri(key)}")
        extra = {"recipe": recipe, "model": model, "bytes": size, "report": report.to_dict()}
        store.upload_dir(ckpt, key, extra=extra)
    logger.info(
        "quantized %s with %s: %.2fx smaller than fp16 -> %s", model, recipe, report.compression_vs_fp16, store.uri(key)
    )
    return store.uri(key)


def _progress(artifact: Any, percent: float, what: str) -> None:
    if artifact is not None:
        update_progress_artifact(artifact, percent, what)
    get_run_logger().info("%s", what)


def _publish(store: Storage, key: str, uri: str, cached: bool) -> None:
    """The ``quantized-checkpoint`` artifacts: URI (link), size, compression, and the calibration plot."""
    record = store.completion_record(key) or {}
    report = record.get("report", {})
    size = record.get("bytes", 0)
    lines = [
        "# Quantized checkpoint",
        "",
        f"- checkpoint: [{uri}]({browse_url(uri)})" + (" (stored earlier: cached)" if cached else ""),
        f"- model {record.get('model', '?')}, recipe {record.get('recipe', '?')}",
        f"- size: {size / 1e6:.2f} MB" if size else "- size: see the completion record",
    ]
    if report:
        lines.append(f"- {report.get('compression_vs_fp16', 0):.2f}x smaller than fp16")
    try:
        png = store.read_bytes(f"{key}/calibration.png")
        data = base64.b64encode(png).decode()
        lines += ["", "## Calibration set (NFDS)", "", f"![NFDS](data:image/png;base64,{data})"]
    except (OSError, RuntimeError):
        lines += ["", "(no calibration plot stored)"]
    create_markdown_artifact("\n".join(lines) + "\n", key="quantized-checkpoint", description=uri)
    create_link_artifact(browse_url(uri), link_text=uri, key="quantized-checkpoint-uri")


@flow(name="quantize", persist_result=True)
def quantize(
    model: str,
    calibration_pool: list[str],
    recipe: str = "quantvggt-w4a8",
    seed: int = 0,
    out: str = "quantvggt-store",
    frames: int = 10,
    clusters: int = 5,
    per_cluster: int = 4,
    epochs: int | None = None,
    scope: list[str] | None = None,
) -> str:
    """Return the URI of the quantized checkpoint for these inputs, computing it only if it is not stored yet.

    ``scope`` None: the shipped scope (``quantvggt.quant.config.SHIPPED_SCOPE``), as the CLI and the demo use.
    """
    from quantvggt.quant import get_recipe
    from quantvggt.quant.config import SHIPPED_SCOPE, recipe_overrides

    scope = list(SHIPPED_SCOPE) if scope is None else list(scope)
    logger = get_run_logger()
    require(model=model, calibration_pool=calibration_pool, out=out)
    overrides = recipe_overrides(seed, scope, epochs)
    get_recipe(recipe, **overrides)  # bad options fail before any work
    store = open_storage(out)
    progress = create_progress_artifact(0.0, key="quantize-progress", description="fetching the calibration pool")
    with tempfile.TemporaryDirectory(prefix="quantvggt-quantize-") as tmp:
        work = Path(tmp)
        logger.info("calibration pool: %s", ", ".join(calibration_pool))
        pool_dirs = _local_pool(calibration_pool, work)
        details = {
            "recipe": recipe,
            "seed": seed,
            "frames": frames,
            "clusters": clusters,
            "per_cluster": per_cluster,
            "epochs": epochs,
            "scope": scope,
        }
        key = f"quantized/{inputs_hash(model, pool_dirs, details)}"
        stored = store.is_complete(key)
        if stored:
            logger.info("quantized checkpoint already stored at %s; not recomputing", store.uri(key))
            uri = quantize_model(key, out, model, recipe, overrides, None, details)
        else:
            cands = nfds.candidate_pool(pool_dirs, frames, seed)
            if not cands:
                raise ValueError(f"no calibration candidates in {calibration_pool}")
            _progress(progress, 5, f"statistics of {len(cands)} calibration candidates")
            futures = [stats_task.submit(model, dataclasses.asdict(c), key.rpartition("/")[2]) for c in cands]
            for i, _ in enumerate(as_completed(futures), 1):
                update_progress_artifact(progress, 5 + 45 * i / len(futures), f"statistics {i} of {len(futures)}")
            rows = [f.result() for f in futures]
            # the store lacks it, so whatever Prefect remembers for this key is stale
            uri = quantize_model.with_options(refresh_cache=True)(
                key, out, model, recipe, overrides, rows, details, progress
            )
    update_progress_artifact(progress, 100.0, f"stored at {uri}")
    latest = record_latest(store.uri("quantized"), uri, {"model": model, "recipe": recipe})
    logger.info("checkpoint %s (recorded as the latest in %s)", uri, latest)
    _publish(store, key, uri, cached=stored)
    return uri

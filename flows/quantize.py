"""Quantize flow: statistics fan-out (tasks) -> NFDS selection -> calibration -> stored checkpoint, once per inputs."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

import quantvggt
from quantvggt.calib import nfds
from quantvggt.model.loading import resolve_source
from quantvggt.pipeline import load_model
from quantvggt.storage import fetch_scene, find_scenes, open_storage, sha256_file


@functools.lru_cache(maxsize=2)
def _shared_model(source: str) -> Any:
    # statistics tasks run in threads of the flow process and share one read-only model
    return load_model(source, device="cpu")


def _local_pool(pool: list[str], work: Path) -> list[Path]:
    """Pool entries as local folders (``s3://`` pools are fetched scene by scene)."""
    out = []
    for i, item in enumerate(pool):
        if str(item).startswith("s3://"):
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
        weights, _ = resolve_source(model) if not model.startswith("s3://") else (None, None)
        h.update((sha256_file(weights) if weights else model).encode())
    except Exception:  # unresolvable here (e.g. hub offline): fall back to the source string
        h.update(model.encode())
    for d in pool_dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(d)}:{p.stat().st_size}".encode())
    h.update(json.dumps({**params, "version": quantvggt.__version__}, sort_keys=True).encode())
    return h.hexdigest()[:16]


@task(name="sample-stats")
def stats_task(model: str, candidate: dict[str, Any]) -> dict[str, Any]:
    """Deep-layer statistics of one calibration candidate (pure function of the sample)."""
    m = _shared_model(model)
    c = nfds.Candidate(**{**candidate, "frames": tuple(candidate["frames"])})
    stats = nfds.sample_stats(m, nfds.load_candidate(c, m.image_size))
    return {"sample_id": c.sample_id, "scene": c.scene, "group": c.group, "frames": list(c.frames), **stats}


@flow(name="quantize")
def quantize(
    model: str,
    calibration_pool: list[str],
    recipe: str = "quantvggt-w4a4",
    seed: int = 0,
    out: str = "quantvggt-store",
    frames: int = 10,
    clusters: int = 5,
    per_cluster: int = 4,
    epochs: int | None = None,
    scope: list[str] | None = None,
) -> str:
    """Return the URI of the quantized checkpoint for these inputs, computing it only if it is not stored yet."""
    from quantvggt.quant import get_recipe, quantize_, save_quantized
    from quantvggt.quant.cli import recipe_overrides

    logger = get_run_logger()
    config = get_recipe(recipe, **recipe_overrides(seed, scope, epochs))  # bad options fail before any work
    store = open_storage(out)
    with tempfile.TemporaryDirectory(prefix="quantvggt-quantize-") as tmp:
        work = Path(tmp)
        pool_dirs = _local_pool(calibration_pool, work)
        params = {
            "recipe": recipe,
            "seed": seed,
            "frames": frames,
            "clusters": clusters,
            "per_cluster": per_cluster,
            "epochs": epochs,
            "scope": list(scope) if scope else None,
        }
        key = f"quantized/{inputs_hash(model, pool_dirs, params)}"
        if store.is_complete(key):
            logger.info("quantized checkpoint already stored at %s; not recomputing", store.uri(key))
            return store.uri(key)
        cands = nfds.candidate_pool(pool_dirs, frames, seed)
        if not cands:
            raise ValueError(f"no calibration candidates in {calibration_pool}")
        futures = [stats_task.submit(model, dataclasses.asdict(c)) for c in cands]
        rows = nfds.select([f.result() for f in futures], clusters, per_cluster, seed)
        manifest = nfds.write_manifest(rows, work / "ckpt-extra" / "calibration.parquet")
        nfds.plot_selection(rows, manifest.with_suffix(".png"))
        logger.info(
            "NFDS: %d selected, %d filtered of %d",
            sum(r["selected"] for r in rows),
            sum(r["outlier"] for r in rows),
            len(rows),
        )
        m = load_model(model, device="cpu")
        calib = nfds.load_selected(manifest, image_size=m.image_size)
        report = quantize_(m, config, calib)
        ckpt = save_quantized(
            m, work / "ckpt", extra={"report": report.to_dict(), "inputs": {"model": model, **params}}
        )
        for f in (manifest, manifest.with_suffix(".png")):
            f.replace(ckpt / f.name)
        store.upload_dir(ckpt, key, extra={"recipe": recipe})
        logger.info(
            "quantized %s with %s: %.2fx smaller than fp16 -> %s",
            model,
            recipe,
            report.compression_vs_fp16,
            store.uri(key),
        )
        return store.uri(key)

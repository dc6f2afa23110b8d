"""Checks of flow and deployment parameters that fail fast, in one line, before any work is queued or started.

Used by the flows (every run checks its parameters first), by ``quantvggt submit`` (before queueing) and by
prefect.yaml's build step :func:`check_deploy_env` (``prefect deploy`` refuses to register deployments whose
templated parameters would be empty).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantvggt.storage import is_remote, open_storage

LATEST = "latest"  # "<store>/quantized/latest": the checkpoint the quantize flow stored last
LATEST_RECORD = "latest.json"
DEPLOY_ENV = {
    "QUANTVGGT_STORE": "storage root holding inbox/, quantized/, reconstructions/ (e.g. s3://my-bucket)",
    "QUANTVGGT_REPO": "absolute path of this repository on the worker machines (e.g. export QUANTVGGT_REPO=$PWD)",
}


class ParameterError(ValueError):
    """A flow, deployment or command parameter is missing, empty or points at nothing."""


def require(**values: Any) -> None:
    """Raise :class:`ParameterError` naming the first parameter that is None, blank, or an empty list."""
    for name, value in values.items():
        blank = value is None or (isinstance(value, str) and not value.strip())
        if isinstance(value, (list, tuple)):
            blank = not value or any(v is None or not str(v).strip() for v in value)
        if blank:
            raise ParameterError(
                f"parameter {name!r} is empty: pass it, or set the environment variable its deployment is templated "
                f"from ({', '.join(DEPLOY_ENV)}) before `prefect deploy`"
            )


def check_deploy_env(names: list[str] | None = None) -> dict[str, str]:
    """prefect.yaml build step: every variable the deployments are templated from must be set and non-empty."""
    missing = [n for n in (names or list(DEPLOY_ENV)) if not os.environ.get(n, "").strip()]
    if missing:
        lines = "; ".join(f"{n}: {DEPLOY_ENV.get(n, 'required')}" for n in missing)
        raise ParameterError(f"set {', '.join(missing)} before `prefect deploy` ({lines}); see infra/README.md")
    store = os.environ["QUANTVGGT_STORE"]
    check_storage_root(store, "QUANTVGGT_STORE")
    repo = Path(os.environ["QUANTVGGT_REPO"]).expanduser()
    if not (repo / "flows" / "reconstruct.py").is_file():
        raise ParameterError(f"QUANTVGGT_REPO={repo}: not this repository (no flows/reconstruct.py in it)")
    return {"store": store, "repo": str(repo)}


def check_storage_root(uri: str, name: str = "out") -> None:
    """A local folder may be created later; an ``s3://`` root needs an existing, reachable bucket."""
    require(**{name: uri})
    if is_remote(uri):
        # a missing key is fine; the probe fails in one line for a missing bucket, denied access, no credentials
        open_storage(uri).exists(".quantvggt-probe")
    elif not Path(uri).expanduser().is_absolute():
        raise ParameterError(f"{name}={uri}: a relative path means different folders on different workers")


def check_inbox(inbox: str) -> None:
    """An inbox must exist: a local folder, or an ``s3://`` prefix in an existing bucket."""
    require(inbox=inbox)
    if is_remote(inbox):
        check_storage_root(inbox, "inbox")
    elif not Path(inbox).expanduser().is_dir():
        raise ParameterError(f"inbox {inbox}: no such folder (was QUANTVGGT_STORE set when the deployment was made?)")


def check_scene_inputs(scenes: list[str]) -> None:
    """Every input must be something: an existing local folder, or an ``s3://`` prefix that holds objects."""
    require(scenes=scenes)
    for item in scenes:
        if is_remote(item):
            if not open_storage(item).list(""):
                raise ParameterError(f"{item}: no objects under this prefix (upload the scene folders first)")
        elif not Path(item).expanduser().is_dir():
            raise ParameterError(f"{item}: no such folder")


def resolve_checkpoint(checkpoint: str) -> str:
    """The checkpoint to load, checked: ``<store>/quantized/latest`` is read from the record the quantize flow
    writes; an ``s3://`` or local path must hold a model; other values (a shipped name, a hub id) pass as they are.
    """
    require(checkpoint=checkpoint)
    parent, _, leaf = checkpoint.rstrip("/").rpartition("/")
    if leaf == LATEST and parent:
        store = open_storage(parent)
        if not store.exists(LATEST_RECORD):
            raise ParameterError(
                f"checkpoint {checkpoint}: no quantized checkpoint stored under {parent} yet; run the quantize "
                "flow first (`prefect deployment run quantize/quantize`), which records it there"
            )
        return str(json.loads(store.read_bytes(LATEST_RECORD))["checkpoint"])
    if is_remote(checkpoint):
        store = open_storage(checkpoint)
        if not any(store.exists(f) for f in ("quant.json", "config.json", "model.safetensors")):
            raise ParameterError(f"checkpoint {checkpoint}: no model there (no quant.json, config.json or weights)")
    elif checkpoint.startswith(("/", ".", "~")) and not Path(checkpoint).expanduser().exists():
        raise ParameterError(f"checkpoint {checkpoint}: no such file or folder")
    return checkpoint


def record_latest(store_root: str, checkpoint: str, details: dict[str, Any]) -> str:
    """Write ``<store_root>/latest.json`` naming ``checkpoint`` (what ``.../latest`` resolves to); returns its URI."""
    store = open_storage(store_root)
    store.write_bytes(LATEST_RECORD, json.dumps({"checkpoint": checkpoint, **details}, indent=1).encode())
    return store.uri(LATEST_RECORD)

"""Ray actors: each loads the model once, then processes scenes; the driver retries scenes of dead workers."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from quantvggt.reconstruct import ReconstructionOptions
from quantvggt.scene import SceneResult, scene_name

log = logging.getLogger(__name__)


@ray.remote
class ReconstructionWorker:
    """Holds one loaded model; ``process`` returns a :class:`SceneResult` and never raises for a bad scene."""

    def __init__(self, model_uri: str, options: dict[str, Any]) -> None:
        import torch

        from quantvggt.pipeline import load_model

        torch.set_num_threads(1 if not torch.cuda.is_available() else torch.get_num_threads())
        self.model = load_model(model_uri)
        self.options = ReconstructionOptions(**options)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def process(self, scene_uri: str, out_uri: str, force: bool, attempt: int) -> SceneResult:
        """Reconstruct one scene and upload it."""
        from quantvggt.pipeline import process_scene

        return process_scene(
            self.model, scene_uri, out_uri, self.options, force=force, attempt=attempt, worker=self.name
        )

    def pid(self) -> int:
        """Process id (used by tests that kill a worker)."""
        return os.getpid()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start a local Ray with ``num_cpus``."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)


def run_scenes(
    scene_uris: list[str],
    model_uri: str,
    out_uri: str,
    options: ReconstructionOptions | None = None,
    num_workers: int = 2,
    force: bool = False,
    max_attempts: int = 3,
    on_dispatch: Callable[[Any, str, int], None] | None = None,
) -> list[SceneResult]:
    """Fan scenes out over ``num_workers`` actors; a scene whose worker dies is retried on a fresh worker.

    Each scene is in flight on at most one worker at a time, and a finished scene is skipped by the worker
    (completion record), so a scene's result is never written twice. One GPU per actor when GPUs exist.
    """
    opts = dataclasses.asdict(options or ReconstructionOptions())
    gpus = ray.cluster_resources().get("GPU", 0)
    actor_cls = (
        ReconstructionWorker.options(num_gpus=1, num_cpus=1) if gpus >= 1 else ReconstructionWorker.options(num_cpus=1)
    )
    n = max(1, min(num_workers, len(scene_uris)))
    idle = [actor_cls.remote(model_uri, opts) for _ in range(n)]
    queue = [(s, 1) for s in scene_uris]
    inflight: dict[Any, tuple[str, int, Any]] = {}
    results: list[SceneResult] = []
    while queue or inflight:
        while queue and idle:
            scene, attempt = queue.pop(0)
            actor = idle.pop()
            ref = actor.process.remote(scene, out_uri, force, attempt)
            inflight[ref] = (scene, attempt, actor)
            if on_dispatch is not None:
                on_dispatch(actor, scene, attempt)
        done, _ = ray.wait(list(inflight), num_returns=1)
        ref = done[0]
        scene, attempt, actor = inflight.pop(ref)
        try:
            results.append(ray.get(ref))
            idle.append(actor)
        except (RayActorError, WorkerCrashedError) as e:
            log.warning("worker died on %s (attempt %d): %s", scene, attempt, e)
            idle.append(actor_cls.remote(model_uri, opts))  # replace the dead worker
            if attempt < max_attempts:
                queue.append((scene, attempt + 1))
            else:
                error = f"worker died {attempt} times: {e}"
                results.append(SceneResult(_name(scene), attempt=attempt, error=error, source=scene))
    for actor in idle:
        ray.kill(actor)
    order = {s: i for i, s in enumerate(scene_uris)}
    return sorted(results, key=lambda r: order.get(r.source, 0))


def _name(scene_uri: str) -> str:
    try:
        return scene_name(scene_uri)
    except ValueError:  # an unnameable URI still gets its row (process_scene reports why it failed)
        return scene_uri

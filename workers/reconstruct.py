"""Ray side of the reconstruct flow: actors that load the model once, and a dispatcher that fans work out to them.

Failures are sorted by whether a retry can help:

- a worker process that dies (crash, OOM kill, lost node) is restarted by Ray (``max_restarts``), which re-runs the
  call it had in flight (``max_task_retries``); an actor gone for good is replaced and its item re-queued, up to
  ``max_attempts`` dispatches;
- a worker whose setup fails (checkpoint missing, no credentials) is deterministic: every item fails at once with
  that error, nothing is retried;
- an item that fails inside a healthy worker comes back as a failed result (``process_scene`` never raises), and
  a call that raises anyway is recorded as failed, not retried.

Actors get the driver's storage configuration as a ``runtime_env`` (:func:`quantvggt.storage.storage_env`), so a
Ray head started before ``AWS_*`` was exported still reaches S3. Their log lines reach the driver's output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from quantvggt.reconstruct import ReconstructionOptions
from quantvggt.scene import SceneResult, scene_name
from quantvggt.storage import storage_env

log = logging.getLogger(__name__)
V = TypeVar("V")
R = TypeVar("R")

ACTOR_MAX_RESTARTS = 2  # Ray restarts a crashed worker this often and re-runs its in-flight call
READY_TIMEOUT_S = 600.0  # a worker not set up by then (no free CPU/GPU in the cluster?) is given up


class WorkerSetupError(RuntimeError):
    """No worker could be set up (the same error would repeat on every retry)."""


def _log_to_stderr() -> None:
    # Ray workers have no logging handler: without one, the library's INFO lines are lost instead of reaching
    # the driver's output (log_to_driver)
    lib = logging.getLogger("quantvggt")
    if not lib.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)


@ray.remote
class ReconstructionWorker:
    """Holds one loaded model; ``process`` returns a :class:`SceneResult` and never raises for a bad scene.

    A setup failure is kept, not raised, so that the driver can tell it (deterministic) from a dead process.
    """

    def __init__(self, model_uri: str, options: dict[str, Any]) -> None:
        _log_to_stderr()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.model_uri = model_uri
        self.setup_error = ""
        try:
            import torch

            from quantvggt.pipeline import load_model

            torch.set_num_threads(1 if not torch.cuda.is_available() else torch.get_num_threads())
            self.options = ReconstructionOptions(**options)
            self.model = load_model(model_uri)
        except Exception as e:
            self.setup_error = f"{type(e).__name__}: {e}"
            log.error("worker %s cannot load %s: %s", self.name, model_uri, self.setup_error)

    def ready(self) -> str:
        """'' once the model is loaded, else why it could not be."""
        return self.setup_error

    def process(self, scene_uri: str, out_uri: str, force: bool, attempt: int, name: str | None = None) -> SceneResult:
        """Reconstruct one scene and upload it as ``OUT/<name>``."""
        from quantvggt.pipeline import process_scene

        if self.setup_error:
            error = f"worker setup failed: {self.setup_error}"
            return SceneResult(
                name or _name(scene_uri), attempt=attempt, error=error, source=scene_uri, worker=self.name
            )
        return process_scene(
            self.model,
            scene_uri,
            out_uri,
            self.options,
            force=force,
            attempt=attempt,
            worker=self.name,
            name=name,
            checkpoint=self.model_uri,
        )

    def pid(self) -> int:
        """Process id (used by tests that kill a worker)."""
        return os.getpid()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to ``address`` or ``RAY_ADDRESS``; with neither, start a private local Ray with ``num_cpus``.

    ``num_cpus`` applies to a local Ray only (a running cluster has its own), and without an address a new local
    instance is started even when another Ray cluster runs on this host. Returns what was connected to.
    """
    if ray.is_initialized():
        return "the Ray instance this process already uses"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
    return "a local Ray started by this process"


class ActorDispatcher:
    """ActorPool-style fan-out over ``size`` actors, replacing actors that die for good.

    Like :class:`ray.util.ActorPool`, ``map_unordered(fn, values)`` calls ``fn(actor, value, attempt)`` (which
    returns an ``ObjectRef``) on idle actors and yields ``(value, result)`` as results arrive. Unlike it, an actor
    that is gone is replaced and its value re-queued (``max_attempts`` dispatches in all), and a value that cannot be
    done becomes a result through ``on_error(value, attempt, error_text)``, so every value yields exactly once.
    Actors must have a ``ready() -> str`` method returning '' once set up (else why not); :meth:`start` waits for it.
    """

    def __init__(
        self,
        make_actor: Callable[[], Any],
        size: int,
        max_attempts: int = 3,
        ready_timeout_s: float | None = READY_TIMEOUT_S,
    ) -> None:
        self.make_actor = make_actor
        self.size = max(1, size)
        self.max_attempts = max_attempts
        self.ready_timeout_s = ready_timeout_s
        self.idle: list[Any] = []

    def __enter__(self) -> ActorDispatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        """Create the actors and wait until they are set up; raises :class:`WorkerSetupError` if none is."""
        actors = [self.make_actor() for _ in range(self.size)]
        pending = {a.ready.remote(): a for a in actors}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=self.ready_timeout_s)
        errors = []
        for ref in ready:
            actor = pending[ref]
            try:
                error = ray.get(ref)
            except RayError as e:  # the actor died while setting up (e.g. an import failed)
                error = _first_line(e)
            if error:
                errors.append(error)
                ray.kill(actor)
            else:
                self.idle.append(actor)
        for ref in late:
            ray.kill(pending[ref])
        if late:
            log.warning(
                "%d of %d workers not set up after %s s; going on without them",
                len(late),
                len(actors),
                self.ready_timeout_s,
            )
        if not self.idle:
            if errors:
                raise WorkerSetupError(errors[0])
            raise WorkerSetupError(
                f"no Ray worker was set up within {self.ready_timeout_s:.0f} s: does the cluster have the resources "
                f"one worker asks for? cluster resources: {ray.cluster_resources()}"
            )

    def map_unordered(
        self,
        fn: Callable[[Any, V, int], Any],
        values: Iterable[V],
        on_error: Callable[[V, int, str], R],
    ) -> Iterator[tuple[V, R]]:
        """Yield ``(value, result)`` for every value, as results arrive."""
        queue: list[tuple[V, int]] = [(v, 1) for v in values]
        inflight: dict[Any, tuple[V, int, Any]] = {}
        while queue or inflight:
            while queue and self.idle:
                value, attempt = queue.pop(0)
                actor = self.idle.pop()
                inflight[fn(actor, value, attempt)] = (value, attempt, actor)
            done, _ = ray.wait(list(inflight), num_returns=1)
            value, attempt, actor = inflight.pop(done[0])
            try:
                result = ray.get(done[0])
            except RayTaskError as e:  # the call raised: a bug or bad input, which a retry would repeat
                self.idle.append(actor)
                yield value, on_error(value, attempt, _first_line(e))
                continue
            except (RayActorError, RayError) as e:  # the process is gone (Ray's own restarts used up): retry
                log.warning(
                    "worker lost on %s (attempt %d of %d): %s", value, attempt, self.max_attempts, _first_line(e)
                )
                ray.kill(actor, no_restart=True)
                self.idle.append(self.make_actor())
                if attempt < self.max_attempts:
                    queue.append((value, attempt + 1))
                else:
                    yield value, on_error(value, attempt, f"worker lost {attempt} times: {_first_line(e)}")
                continue
            self.idle.append(actor)
            yield value, result

    def shutdown(self) -> None:
        """Kill the idle actors (busy ones are not left: map_unordered returns when all values are done)."""
        for actor in self.idle:
            ray.kill(actor)
        self.idle = []


def run_scenes(
    scene_uris: list[str],
    model_uri: str,
    out_uri: str,
    options: ReconstructionOptions | None = None,
    num_workers: int = 2,
    force: bool = False,
    max_attempts: int = 3,
    on_dispatch: Callable[[Any, str, int], None] | None = None,
    names: dict[str, str] | None = None,
    on_result: Callable[[SceneResult], None] | None = None,
    ready_timeout_s: float | None = READY_TIMEOUT_S,
) -> list[SceneResult]:
    """Reconstruct scenes on ``num_workers`` actors; one :class:`SceneResult` per scene, in input order, always.

    ``names`` maps a scene URI to its output name (default :func:`scene_name`). Each scene is in flight on at most
    one worker at a time and a finished scene is skipped by the worker (completion record), so a scene's result is
    never written twice. One GPU per actor when the cluster has GPUs. A failure to set up workers fails every
    scene with that error, without retries.
    """
    names = names or {}
    opts = dataclasses.asdict(options or ReconstructionOptions())
    gpus = ray.cluster_resources().get("GPU", 0)
    actor_cls = ReconstructionWorker.options(
        num_cpus=1,
        num_gpus=1 if gpus >= 1 else 0,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_RESTARTS,
        runtime_env={"env_vars": storage_env()},
    )

    def failed(scene: str, attempt: int, error: str) -> SceneResult:
        return SceneResult(names.get(scene) or _name(scene), attempt=attempt, error=error, source=scene)

    def dispatch(actor: Any, scene: str, attempt: int) -> Any:
        ref = actor.process.remote(scene, out_uri, force, attempt, names.get(scene))
        if on_dispatch is not None:
            on_dispatch(actor, scene, attempt)
        return ref

    results: dict[str, SceneResult] = {}
    if scene_uris:
        n = min(num_workers, len(scene_uris))
        pool = ActorDispatcher(lambda: actor_cls.remote(model_uri, opts), n, max_attempts, ready_timeout_s)
        try:
            with pool:
                for scene, result in pool.map_unordered(dispatch, scene_uris, failed):
                    results[scene] = result
                    _log_result(result, len(results), len(scene_uris))
                    if on_result is not None:
                        on_result(result)
        except WorkerSetupError as e:  # deterministic: the same error for every scene, no retries
            log.error("no worker could start: %s", e)
            for scene in scene_uris:
                if scene not in results:
                    results[scene] = failed(scene, 0, f"worker setup failed: {e}")
                    if on_result is not None:
                        on_result(results[scene])
    return [results[s] for s in scene_uris]


def _log_result(r: SceneResult, done: int, total: int) -> None:
    what = f"{r.images} images, {r.points} points" if r.ok else f"FAILED: {r.error}"
    level = logging.INFO if r.ok else logging.WARNING
    log.log(
        level, "[%d/%d] %s %s in %.1f s (attempt %d): %s", done, total, r.scene, r.status, r.seconds, r.attempt, what
    )


def _first_line(e: BaseException) -> str:
    # Ray's errors carry the remote traceback; a manifest row wants the cause: the remote exception itself, or the
    # first line of Ray's own message (why the actor died)
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _name(scene_uri: str) -> str:
    try:
        return scene_name(scene_uri)
    except ValueError:  # an unnameable URI still gets its row (process_scene reports why it failed)
        return scene_uri

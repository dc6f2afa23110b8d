"""Ray side of the reconstruct flow: actors that load the model once, and a dispatcher that fans work out to them.

Failures are sorted by whether a retry can help:

- a worker process that dies (crash, OOM kill, lost node) is restarted by Ray (``max_restarts``), which re-runs the
  call it had in flight (``max_task_retries``); an actor gone for good is replaced and its item re-queued, up to
  ``max_attempts`` dispatches;
- a worker whose setup fails (checkpoint missing, no credentials) is deterministic: every item fails at once with
  that error, nothing is retried;
- an item that fails inside a healthy worker comes back as a failed result (``quantvggt.reconstruct.guarded``), and
  a call that raises anyway is recorded as failed, not retried.

A scene of more than ``max_frames`` images is reconstructed by map/reduce over the same actors
(:mod:`workers.chunks`): one actor plans it, its chunks are predicted wherever an actor is free (each reading only its
own images), and one actor aligns, merges and writes the COLMAP model. Smaller scenes run whole, one per actor.

Each actor holds ``in_flight`` calls at once (threaded actor, ``max_concurrency``), its model one forward pass at a
time (:class:`quantvggt.predict.OneForwardAtATime`): while one scene is on the model, the other downloads and
decodes its images or exports and uploads its result, so I/O waits hide behind compute instead of adding to the wall
time (:func:`workers.data.run_scenes_data` does the same with Ray Data's ``max_concurrent_calls_per_actor``).

Actors get the driver's storage configuration and kernel selections as a ``runtime_env``
(:func:`quantvggt.storage.storage_env`, :func:`quantvggt.lowbit.registry.kernel_env`), so a Ray head started before
``AWS_*`` or ``QUANTVGGT_CPU_MODE`` was exported still uses them. Their log lines reach the driver's output.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError

from quantvggt.lowbit.registry import kernel_env
from quantvggt.options import ReconstructionOptions
from quantvggt.predict import OneForwardAtATime
from quantvggt.reconstruct import SceneJob, ScenePlan
from quantvggt.scene import SceneResult, scene_label
from quantvggt.storage import storage_env

log = logging.getLogger(__name__)
V = TypeVar("V")
R = TypeVar("R")

ACTOR_MAX_RESTARTS = 2  # Ray restarts a crashed worker this often and re-runs its in-flight call
READY_TIMEOUT_S = 600.0  # a worker not set up by then (no free CPU/GPU in the cluster?) is given up
CAPACITY_TIMEOUT_S = 300.0  # items waiting with no worker alive or placeable this long fail with the reason
POLL_S = 2.0  # how often lost nodes and timeouts are checked while calls run


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
    """Holds one loaded model and runs the steps of :mod:`workers.chunks` on :class:`SceneJob` s; never raises for a
    bad scene.

    A setup failure is kept, not raised, so that the driver can tell it (deterministic) from a dead process.
    """

    def __init__(self, model_uri: str, cpus: int = 1, kernels: dict[str, Any] | None = None) -> None:
        _log_to_stderr()
        self.node_id = ray.get_runtime_context().get_node_id()
        # host:pid names the process; the node id tells two Ray nodes on one host apart
        self.name = f"{socket.gethostname()}:{os.getpid()}@{self.node_id[:8]}"
        self.model_uri = model_uri
        self.setup_error = ""
        try:
            from quantvggt.quant.load import load_model

            # as many threads as the CPUs Ray gave this actor (num_cpus): more would oversubscribe the node's cores
            torch.set_num_threads(max(1, cpus) if not torch.cuda.is_available() else torch.get_num_threads())
            self.model = OneForwardAtATime(load_model(model_uri, kernels=kernels))  # the driver's KernelOptions
        except Exception as e:
            self.setup_error = f"{type(e).__name__}: {e}"
            log.error("worker %s cannot load %s: %s", self.name, model_uri, self.setup_error)

    def ready(self) -> str:
        """'' once the model is loaded, else why it could not be."""
        return self.setup_error

    def node(self) -> str:
        """The Ray node id this worker runs on (the dispatcher notices when that node leaves the cluster)."""
        return self.node_id

    def _setup_failed(self, job: SceneJob, attempt: int) -> SceneResult:
        error = f"worker setup failed: {self.setup_error}"
        return SceneResult(job.name, attempt=attempt, error=error, source=job.source, worker=self.name)

    def start(self, job: SceneJob, attempt: int) -> SceneResult | ScenePlan:
        """Reconstruct a scene that fits one pass, else plan its chunks (:func:`workers.chunks.start_scene`)."""
        from workers.chunks import start_scene

        if self.setup_error:
            return self._setup_failed(job, attempt)
        return start_scene(self.model, job, attempt, self.name)

    def predict_chunk(self, plan: ScenePlan, k: int, attempt: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Map: chunk ``k`` of ``plan`` -> (how it went, its prediction as arrays or None); never raises."""
        import time

        from workers.chunks import predict_chunk

        t0 = time.perf_counter()
        meta: dict[str, Any] = {"worker": self.name, "attempt": attempt, "error": ""}
        data = None
        try:
            if self.setup_error:
                raise RuntimeError(f"worker setup failed: {self.setup_error}")
            data = predict_chunk(self.model, plan, k)
        except Exception as e:  # reported by the reduce step (ChunkMerger.fail), never dropped
            meta["error"] = f"{type(e).__name__}: {e}"
            log.warning("%s chunk %d failed: %s", plan.job.name, k, meta["error"])
        meta["seconds"] = round(time.perf_counter() - t0, 4)
        return meta, data

    def reduce(self, plan: ScenePlan, metas: list[dict[str, Any]], chunks: list[Any], attempt: int) -> SceneResult:
        """Reduce: merge ``chunks`` (ObjectRefs, fetched one at a time) and write the scene's model."""
        from workers.chunks import reduce_scene

        if self.setup_error:
            return self._setup_failed(plan.job, attempt)

        def get(k: int) -> dict[str, Any]:
            return ray.get(chunks[k])

        return reduce_scene(self.model, plan, metas, get, attempt, self.name)

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
    """ActorPool-style fan-out over ``size`` actors that never waits forever on a lost node.

    Like :class:`ray.util.ActorPool`, ``map_unordered(fn, values)`` calls ``fn(actor, value, attempt)`` (which
    returns an ``ObjectRef``) on idle actors and yields ``(value, result)`` as results arrive. Unlike it:

    - an actor that dies, or whose node is gone from the cluster (checked every ``poll_s``: Ray would keep its call
      pending while it waits to restart the actor somewhere, for ever if there is no room), is killed, replaced when
      the cluster has room, and its value re-queued (``max_attempts`` dispatches in all);
    - a call running longer than ``item_timeout_s`` (None: no limit) is treated the same way;
    - when values wait and no actor is alive or placeable for ``capacity_timeout_s``, they fail with the reason;
    - a value that cannot be done becomes a result through ``on_error(value, attempt, error_text)``, so every value
      yields exactly once;
    - each actor holds up to ``slots`` calls (a threaded actor's ``max_concurrency``); a new call goes to the actor
      with the fewest, and an actor lost re-queues all of its calls.

    Actors must have ``ready() -> str`` ('' once set up, else why not) and ``node() -> str`` (their Ray node id).
    """

    def __init__(
        self,
        make_actor: Callable[[], Any],
        size: int,
        max_attempts: int = 3,
        ready_timeout_s: float | None = READY_TIMEOUT_S,
        capacity_timeout_s: float = CAPACITY_TIMEOUT_S,
        item_timeout_s: float | None = None,
        poll_s: float = POLL_S,
        slots: int = 1,
    ) -> None:
        self.make_actor = make_actor
        self.slots = max(1, slots)
        self.dead: set[str] = set()  # ids of actors killed as lost: their other calls end with them
        self.size = max(1, size)
        self.max_attempts = max_attempts
        self.ready_timeout_s = ready_timeout_s
        self.capacity_timeout_s = capacity_timeout_s
        self.item_timeout_s = item_timeout_s
        self.poll_s = poll_s
        self.idle: list[Any] = []  # one entry per free slot
        self.node_of: dict[Any, str] = {}  # actor id -> Ray node id
        self.starting: dict[Any, Any] = {}  # ready() ref -> replacement actor not set up yet
        self.queue: list[tuple[Any, int]] = []

    def add(self, value: Any) -> None:
        """Queue one more value while :meth:`map_unordered` runs (e.g. the chunks of a scene just planned)."""
        self.queue.append((value, 1))

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
            error = self._setup(pending[ref], ref)
            if error:
                errors.append(error)
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

    def _setup(self, actor: Any, ready_ref: Any) -> str:
        """'' and ``actor`` idle once its ready() answered ''; else the error (the actor is killed)."""
        try:
            error = ray.get(ready_ref)
            if not error:
                self.node_of[_aid(actor)] = ray.get(actor.node.remote())
        except RayError as e:  # the actor died while setting up (e.g. an import failed, its node went away)
            error = _first_line(e)
        if error:
            ray.kill(actor)
            return error
        self.idle.extend([actor] * self.slots)
        return ""

    def _replace(self) -> None:
        """Start a replacement actor (placed whenever the cluster has room; until then it only waits)."""
        actor = self.make_actor()
        self.starting[actor.ready.remote()] = actor

    def _alive(self) -> int:
        return len(self.idle) + len(self.starting)

    def _lost(self, actor: Any) -> None:
        aid = _aid(actor)
        if aid in self.dead:  # a second call of an actor already replaced
            return
        self.dead.add(aid)
        ray.kill(actor, no_restart=True)
        self.node_of.pop(aid, None)
        self.idle = [a for a in self.idle if _aid(a) != aid]
        self._replace()

    def _free(self, actor: Any) -> None:
        if _aid(actor) not in self.dead:
            self.idle.append(actor)

    def _least_busy(self, inflight: dict[Any, tuple[Any, int, Any, float]]) -> Any:
        busy: dict[str, int] = {}
        for _, _, a, _ in inflight.values():
            busy[_aid(a)] = busy.get(_aid(a), 0) + 1
        i = min(range(len(self.idle)), key=lambda j: busy.get(_aid(self.idle[j]), 0))
        return self.idle.pop(i)

    def map_unordered(
        self,
        fn: Callable[[Any, V, int], Any],
        values: Iterable[V],
        on_error: Callable[[V, int, str], R],
    ) -> Iterator[tuple[V, R]]:
        """Yield ``(value, result)`` for every value, and every value :meth:`add`-ed meanwhile, as results arrive."""
        self.queue = queue = [(v, 1) for v in values]
        inflight: dict[Any, tuple[V, int, Any, float]] = {}
        starved_since: float | None = None

        def retry_or_fail(value: V, attempt: int, why: str) -> Iterator[tuple[V, R]]:
            log.warning("worker lost on %s (attempt %d of %d): %s", value, attempt, self.max_attempts, why)
            if attempt < self.max_attempts:
                queue.append((value, attempt + 1))
            else:
                yield value, on_error(value, attempt, f"worker lost {attempt} times: {why}")

        while queue or inflight:
            while queue and self.idle:
                value, attempt = queue.pop(0)
                actor = self._least_busy(inflight)
                inflight[fn(actor, value, attempt)] = (value, attempt, actor, time.monotonic())
            if queue and not self.idle and not inflight:  # nothing runs and nothing can start yet
                starved_since = starved_since or time.monotonic()
                if time.monotonic() - starved_since > self.capacity_timeout_s:
                    why = (
                        f"no Ray worker could be placed for {self.capacity_timeout_s:.0f} s (a lost node and no "
                        f"room left?); cluster resources now: {ray.cluster_resources()}"
                    )
                    log.error("%s; failing the %d items that wait", why, len(queue))
                    while queue:
                        value, attempt = queue.pop(0)
                        yield value, on_error(value, attempt, why)
                    break
            else:
                starved_since = None
            refs = list(inflight) + list(self.starting)
            done, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s) if refs else ([], [])
            if not refs:
                time.sleep(self.poll_s)
            if not done:
                yield from self._check(inflight, retry_or_fail)
                continue
            ref = done[0]
            if ref in self.starting:
                actor = self.starting.pop(ref)
                if error := self._setup(actor, ref):
                    log.warning("a replacement worker could not be set up: %s", error)
                continue
            value, attempt, actor, _ = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as e:  # the call raised: a bug or bad input, which a retry would repeat
                self._free(actor)
                yield value, on_error(value, attempt, _first_line(e))
                continue
            except (RayActorError, RayError) as e:  # the process is gone (Ray's own restarts used up): retry
                self._lost(actor)
                yield from retry_or_fail(value, attempt, _first_line(e))
                continue
            self._free(actor)
            yield value, result

    def _check(
        self, inflight: dict[Any, tuple[V, int, Any, float]], retry_or_fail: Callable[[V, int, str], Iterator[Any]]
    ) -> Iterator[tuple[V, R]]:
        """Calls on actors whose node is gone, or over ``item_timeout_s``: their actors lost, values re-queued."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        now = time.monotonic()
        for ref, (value, attempt, actor, started) in list(inflight.items()):
            node = self.node_of.get(_aid(actor))
            why = ""
            if node is not None and node not in alive:
                why = f"its Ray node {node[:12]} left the cluster"
            elif self.item_timeout_s is not None and now - started > self.item_timeout_s:
                why = f"no answer within {self.item_timeout_s:.0f} s"
            if why:
                del inflight[ref]  # its actor is killed below: the call ends with it
                self._lost(actor)
                yield from retry_or_fail(value, attempt, why)
        for ref, actor in list(self.starting.items()):  # a replacement placed on a node that then left
            if self.node_of.get(_aid(actor)) not in (None, *alive):
                del self.starting[ref]

    def shutdown(self) -> None:
        """Kill the idle and still-starting actors (busy ones are not left: map_unordered returns when all is done)."""
        for actor in {_aid(a): a for a in [*self.idle, *self.starting.values()]}.values():
            ray.kill(actor)
        self.idle, self.starting = [], {}


def _aid(actor: Any) -> str:
    return actor._actor_id.hex()


def check_whole(**values: Any) -> None:
    """Raise a one-line ValueError for a worker setting that is not a whole number >= 1 (booleans included)."""
    for what, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a whole number >= 1, got {v!r}")


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
    cpus_per_worker: int = 1,
    on_plan: Callable[[ScenePlan], None] | None = None,
    capacity_timeout_s: float = CAPACITY_TIMEOUT_S,
    item_timeout_s: float | None = None,
    kernels: dict[str, Any] | None = None,
    in_flight: int = 2,
) -> list[SceneResult]:
    """Reconstruct scenes on ``num_workers`` actors; one :class:`SceneResult` per scene, in input order, always.

    ``names`` maps a scene URI to its output name (default :func:`scene_name`). Each scene is in flight on at most
    one worker at a time (a chunked scene: each of its chunks, then its one reduce) and a finished scene is skipped by
    the worker (completion record), so a scene's result is never written twice. A scene over ``options.max_frames``
    images is split: its chunks are map tasks on any free actor, its merge and write one reduce task
    (:mod:`workers.chunks`); ``on_plan`` sees each such plan before its chunks are queued. Each actor takes
    ``cpus_per_worker`` CPUs (and as many torch threads), one GPU when the cluster has GPUs, and holds ``in_flight``
    calls (one on the model, the others' I/O and export overlapping it). A failure to set up workers fails every
    scene with that error, without retries.
    """
    check_whole(cpus_per_worker=cpus_per_worker, in_flight=in_flight)
    names = names or {}
    opts = options or ReconstructionOptions()
    checkpoint = model_uri
    gpus = ray.cluster_resources().get("GPU", 0)
    actor_cls = ReconstructionWorker.options(
        num_cpus=cpus_per_worker,
        num_gpus=1 if gpus >= 1 else 0,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_RESTARTS,
        max_concurrency=in_flight,
        runtime_env={"env_vars": {**storage_env(), **kernel_env()}},  # e.g. QUANTVGGT_CPU_MODE=memory reaches them
    )
    plans: dict[str, ScenePlan] = {}
    metas: dict[str, dict[int, dict[str, Any]]] = {}  # scene -> chunk -> how its map task went
    payloads: dict[tuple[str, int], Any] = {}  # (scene, chunk) -> ObjectRef of its arrays, held until the reduce

    jobs: dict[str, SceneJob] = {}
    unnamed: dict[str, str] = {}
    for scene in scene_uris:
        try:
            jobs[scene] = SceneJob(scene, out_uri, names.get(scene) or "", opts, force, checkpoint)
        except ValueError as e:  # an unnameable URI: its row says why, the others go on
            unnamed[scene] = f"ValueError: {e}"

    def failed(scene: str, attempt: int, error: str) -> SceneResult:
        return SceneResult(names.get(scene) or scene_label(scene), attempt=attempt, error=error, source=scene)

    def on_error(item: tuple[str, str, int], attempt: int, error: str) -> Any:
        kind, scene, _ = item
        if kind == "chunk":  # the scene goes on: its reduce reports this chunk as failed, with the error
            return {"error": error, "attempt": attempt, "worker": ""}
        return failed(scene, attempt, error)

    def dispatch(actor: Any, item: tuple[str, str, int], attempt: int) -> Any:
        kind, scene, k = item
        if kind == "scene":
            ref = actor.start.remote(jobs[scene], attempt)
            if on_dispatch is not None:
                on_dispatch(actor, scene, attempt)
            return ref
        plan = plans[scene]
        if kind == "chunk":
            # two returns: the driver waits on the small one; the arrays stay in the object store for the reduce
            meta, data = actor.predict_chunk.options(num_returns=2).remote(plan, k, attempt)
            payloads[(scene, k)] = data
            return meta
        n = plan.n_chunks
        refs = [payloads.get((scene, j)) for j in range(n)]  # in a list: passed as refs, fetched one at a time
        return actor.reduce.remote(plan, [metas[scene][j] for j in range(n)], refs, attempt)

    results: dict[str, SceneResult] = {}

    def finish(scene: str, result: SceneResult) -> None:
        results[scene] = result
        _log_result(result, len(results), len(scene_uris))
        if on_result is not None:
            on_result(result)

    for scene, error in unnamed.items():
        finish(scene, failed(scene, 0, error))
    if jobs:
        # all num_workers actors even for fewer scenes: one large scene's chunks can keep every one of them busy
        pool = ActorDispatcher(
            lambda: actor_cls.remote(model_uri, cpus_per_worker, kernels),
            num_workers,
            max_attempts,
            ready_timeout_s,
            capacity_timeout_s,
            item_timeout_s,
            slots=in_flight,
        )
        try:
            with pool:
                items = [("scene", s, -1) for s in scene_uris if s in jobs]
                for (kind, scene, k), result in pool.map_unordered(dispatch, items, on_error):
                    if kind == "scene" and isinstance(result, ScenePlan):
                        plans[scene], metas[scene] = result, {}
                        if on_plan is not None:
                            on_plan(result)
                        for j in range(result.n_chunks):
                            pool.add(("chunk", scene, j))
                    elif kind == "chunk":
                        metas[scene][k] = result
                        if len(metas[scene]) == plans[scene].n_chunks:
                            pool.add(("reduce", scene, -1))
                    else:
                        for j in range(plans[scene].n_chunks if scene in plans else 0):
                            payloads.pop((scene, j), None)  # the reduce has them: free the object store
                        finish(scene, result)
        except WorkerSetupError as e:  # deterministic: the same error for every scene, no retries
            log.error("no worker could start: %s", e)
            for scene in scene_uris:
                if scene not in results:
                    finish(scene, failed(scene, 0, f"worker setup failed: {e}"))
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

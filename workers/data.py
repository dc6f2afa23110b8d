"""The reconstruct fan-out on Ray Data: scenes and their chunks as dataset rows, the model in callable-class actors.

:func:`run_scenes_data` has the signature and the result contract of :func:`workers.reconstruct.run_scenes` (one
:class:`SceneResult` per scene, input order, none lost or duplicated) and runs the same steps (:mod:`workers.chunks`):

1. **scenes**: one row (block) per scene -> ``map_batches(_SceneStage)``: a scene within the single-pass limit is
   reconstructed whole (a result row), a larger one planned (a plan row);
2. **chunks** (only when some scene was planned): one row per chunk -> ``map_batches(_ChunkStage)`` (each chunk's
   images only), gathered by scene on the driver;
3. **reduce**: one row per planned scene (its plan and chunk outcomes) -> ``map_batches(_ReduceStage)``: merge,
   export, commit, one result row per scene.

Every stage is an actor pool of ``num_workers`` actors (``ActorPoolStrategy``) with ``num_cpus=cpus_per_worker`` that
loads the model once; with ``in_flight`` > 1 each actor runs that many calls at once in threads
(``max_concurrent_calls_per_actor``), its model one forward pass at a time, so one scene's I/O overlaps another's
compute. Failures, sorted as in :mod:`workers.reconstruct`:

- a setup failure (checkpoint missing) is kept by the actor, never raised, so Ray Data does not retry it: each row it
  gets comes back as a failed result with that error;
- a worker process that dies is restarted by Ray and the block it held re-run (``max_task_retries =
  max_attempts - 1``); a block that still fails is given up (``DataContext.max_errored_blocks = -1``: the batch goes
  on) and its scene gets a failed row from the driver, which knows which scenes have no result;
- a scene that fails inside a healthy worker comes back as a failed row (:func:`quantvggt.reconstruct.guarded`).

What Ray Data does not give (measured: docs/BENCHMARKS.md, "Ray Data vs the dispatcher") is a bound on waiting for
capacity after a node is lost: a restarted actor that has no room waits for it, and so does the block it held. The
driver bounds it here (``capacity_timeout_s`` without a row while no pending actor can be placed: the scenes left fail
with the reason), the way :class:`workers.reconstruct.ActorDispatcher` does.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray

from quantvggt.lowbit.registry import kernel_env
from quantvggt.options import ReconstructionOptions
from quantvggt.predict import OneForwardAtATime
from quantvggt.reconstruct import SceneJob, ScenePlan
from quantvggt.scene import SceneResult, scene_label
from quantvggt.storage import storage_env
from workers.reconstruct import CAPACITY_TIMEOUT_S, _log_result, _log_to_stderr, check_whole

log = logging.getLogger(__name__)

_DONE = object()  # the end of a dataset's rows (the reader thread's last message)


class _Stage:
    """A callable-class UDF holding one loaded model; a setup failure is kept (deterministic: never retried)."""

    def __init__(self, model_uri: str, cpus: int = 1, kernels: dict[str, Any] | None = None) -> None:
        _log_to_stderr()
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.name = f"{socket.gethostname()}:{os.getpid()}@{self.node_id[:8]}"
        # Ray re-runs a dead actor's block on its restart: the attempt a result reports is 1 + the actor's restarts
        self.attempt = 1 + _restarts(ctx) if ctx.was_current_actor_reconstructed else 1
        self.setup_error = ""
        try:
            import torch

            from quantvggt.quant.load import load_model

            # as many threads as the CPUs Ray gave this actor (num_cpus): more would oversubscribe the node's cores
            torch.set_num_threads(max(1, cpus) if not torch.cuda.is_available() else torch.get_num_threads())
            # calls in flight on this actor (max_concurrent_calls_per_actor) share one model, a pass at a time
            self.model = OneForwardAtATime(load_model(model_uri, kernels=kernels))
        except Exception as e:
            self.setup_error = f"{type(e).__name__}: {e}"
            log.error("worker %s cannot load %s: %s", self.name, model_uri, self.setup_error)

    def _setup_failed(self, job: SceneJob) -> SceneResult:
        error = f"worker setup failed: {self.setup_error}"
        return SceneResult(job.name, attempt=self.attempt, error=error, source=job.source, worker=self.name)


def _restarts(ctx: Any) -> int:
    try:
        from ray._private import state

        return int(state.actors(actor_id=ctx.get_actor_id()).get("NumRestarts", 1))
    except Exception:  # only a label: a GCS hiccup must not fail the scene
        return 1


def _rows(**cols: list[Any]) -> dict[str, np.ndarray]:
    """A numpy batch of object columns (bytes, str) and int columns."""
    out = {}
    for k, v in cols.items():
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        out[k] = arr if k not in ("idx", "k") else np.asarray(v, dtype=np.int64)
    return out


class _SceneStage(_Stage):
    """Whole scenes: a result row, or a plan row for a scene over the single-pass limit."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from workers.chunks import start_scene

        kinds, payloads = [], []
        for raw in batch["job"]:
            job: SceneJob = pickle.loads(raw)
            out = self._setup_failed(job) if self.setup_error else start_scene(self.model, job, self.attempt, self.name)
            kinds.append("plan" if isinstance(out, ScenePlan) else "result")
            payloads.append(pickle.dumps(out))
        return _rows(idx=list(batch["idx"]), kind=kinds, payload=payloads)


class _ChunkStage(_Stage):
    """Map: one chunk's images -> (how it went, its prediction as arrays or None); never raises."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from workers.chunks import predict_chunk

        metas, datas = [], []
        for raw, k in zip(batch["plan"], batch["k"]):
            plan: ScenePlan = pickle.loads(raw)
            t0 = time.perf_counter()
            meta: dict[str, Any] = {"worker": self.name, "attempt": self.attempt, "error": ""}
            data = None
            try:
                if self.setup_error:
                    raise RuntimeError(f"worker setup failed: {self.setup_error}")
                data = predict_chunk(self.model, plan, int(k))
            except Exception as e:  # reported by the reduce step (ChunkMerger.fail), never dropped
                meta["error"] = f"{type(e).__name__}: {e}"
                log.warning("%s chunk %d failed: %s", plan.job.name, k, meta["error"])
            meta["seconds"] = round(time.perf_counter() - t0, 4)
            metas.append(pickle.dumps(meta))
            datas.append(pickle.dumps(data))
        return _rows(idx=list(batch["idx"]), k=list(batch["k"]), plan=list(batch["plan"]), meta=metas, data=datas)


class _ReduceStage(_Stage):
    """Reduce: one scene's plan and chunk outcomes -> merged, exported, committed: one result row."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from workers.chunks import reduce_scene

        payloads = []
        for raw in batch["payload"]:
            plan, metas, datas = pickle.loads(raw)
            if self.setup_error:
                result = self._setup_failed(plan.job)
            else:
                get = (lambda d: lambda k: pickle.loads(d[k]))(datas)  # bound now: B023
                result = reduce_scene(self.model, plan, metas, get, self.attempt, self.name)
            payloads.append(pickle.dumps(result))
        return _rows(idx=list(batch["idx"]), kind=["result"] * len(payloads), payload=payloads)


def _map_args(
    num_workers: int,
    cpus_per_worker: int,
    max_attempts: int,
    model_uri: str,
    kernels: dict[str, Any] | None,
    in_flight: int = 1,
) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0)
    threaded = (
        {"max_concurrent_calls_per_actor": in_flight, "enable_true_multi_threading": True} if in_flight > 1 else {}
    )
    try:
        compute = ActorPoolStrategy(size=num_workers, **threaded)
    except TypeError as e:  # Ray Data before max_concurrent_calls_per_actor
        raise ValueError(f"in_flight={in_flight} on Ray Data needs a newer Ray than {ray.__version__}: {e}") from e
    return {
        "compute": compute,
        "num_cpus": cpus_per_worker,
        "num_gpus": 1 if gpus >= 1 else 0,
        "fn_constructor_kwargs": {"model_uri": model_uri, "cpus": cpus_per_worker, "kernels": kernels},
        # Ray Data's defaults retry for ever (-1); a block re-runs max_attempts times in all, then is given up
        "max_restarts": -1,
        "max_task_retries": max(0, max_attempts - 1),
        "runtime_env": {"env_vars": {**storage_env(), **kernel_env()}},
    }


def _context() -> Any:
    """The DataContext the batch's datasets run under (a copy: the caller's stays as it was)."""
    import copy

    from ray.data import DataContext

    ctx = copy.deepcopy(DataContext.get_current())
    ctx.max_errored_blocks = -1  # a block given up fails its scene, not the batch (the driver fills its row)
    return ctx


def _stream(ds: Any, capacity_timeout_s: float, what: str) -> Iterator[dict[str, Any]]:
    """The dataset's rows as they come; raises :class:`TimeoutError` when none came for ``capacity_timeout_s``
    while an actor waits for room it cannot get (a lost node), instead of waiting for ever."""
    q: queue.Queue[Any] = queue.Queue(maxsize=64)
    executors: list[Any] = []
    create = getattr(ds, "_create_executor", None)
    if create is not None:  # private: kept to stop the execution after a timeout (else its thread waits on)

        def creating() -> Any:
            executors.append(create())
            return executors[-1]

        ds._create_executor = creating

    def read() -> None:
        try:
            for row in ds.iter_rows():
                q.put(row)
            q.put(_DONE)
        except BaseException as e:  # the consumer re-raises it
            q.put(e)

    threading.Thread(target=read, name=f"ray-data-{what}", daemon=True).start()
    waited_since: float | None = None
    while True:
        try:
            item = q.get(timeout=min(2.0, capacity_timeout_s))
        except queue.Empty:
            if not _starved():
                waited_since = None
                continue
            waited_since = waited_since or time.monotonic()
            if time.monotonic() - waited_since > capacity_timeout_s:
                for ex in executors:
                    try:
                        ex.shutdown(force=True)
                    except Exception as e:  # best effort: the rows are failed by the caller either way
                        log.warning("could not stop the Ray Data execution: %s", e)
                raise TimeoutError(
                    f"no Ray worker could be placed for {capacity_timeout_s:.0f} s (a lost node and no room left?); "
                    f"cluster resources now: {ray.cluster_resources()}"
                ) from None
            continue
        waited_since = None
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _starved() -> bool:
    """True when Ray Data's actors wait for room (pending creation or a restart) and none of them is alive: the
    dispatcher's rule (``capacity_timeout_s`` counts only while nothing can run)."""
    try:
        from ray._private import state

        actors = [a for a in state.actors().values() if "MapWorker" in str(a.get("ActorClassName", ""))]
    except Exception:  # no GCS answer: never time out for this reason
        return False
    states = {a.get("State") for a in actors}
    return bool(states & {"PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY"}) and "ALIVE" not in states


def run_scenes_data(
    scene_uris: list[str],
    model_uri: str,
    out_uri: str,
    options: ReconstructionOptions | None = None,
    num_workers: int = 2,
    force: bool = False,
    max_attempts: int = 3,
    names: dict[str, str] | None = None,
    on_result: Callable[[SceneResult], None] | None = None,
    cpus_per_worker: int = 1,
    on_plan: Callable[[ScenePlan], None] | None = None,
    capacity_timeout_s: float = CAPACITY_TIMEOUT_S,
    kernels: dict[str, Any] | None = None,
    in_flight: int = 2,
) -> list[SceneResult]:
    """:func:`workers.reconstruct.run_scenes` on Ray Data: one :class:`SceneResult` per scene, in input order.

    ``in_flight`` calls run at once on each actor (threads; its model one forward pass at a time), as in
    :func:`workers.reconstruct.run_scenes`.
    """
    import ray.data

    check_whole(cpus_per_worker=cpus_per_worker, in_flight=in_flight)
    names = names or {}
    opts = options or ReconstructionOptions()
    results: dict[int, SceneResult] = {}

    def failed(i: int, attempt: int, error: str) -> SceneResult:
        scene = scene_uris[i]
        return SceneResult(names.get(scene) or scene_label(scene), attempt=attempt, error=error, source=scene)

    def finish(i: int, result: SceneResult) -> None:
        if i in results:  # Ray Data re-ran a block whose first output had arrived: a bug, never a second row
            raise RuntimeError(f"two results for scene {scene_uris[i]}: {results[i].status}, then {result.status}")
        results[i] = result
        _log_result(result, len(results), len(scene_uris))
        if on_result is not None:
            on_result(result)

    jobs: dict[int, SceneJob] = {}
    for i, scene in enumerate(scene_uris):
        try:
            jobs[i] = SceneJob(scene, out_uri, names.get(scene) or "", opts, force, model_uri)
        except ValueError as e:  # an unnameable URI: its row says why, the others go on
            finish(i, failed(i, 0, f"ValueError: {e}"))
    args = _map_args(num_workers, cpus_per_worker, max_attempts, model_uri, kernels, in_flight)
    from ray.data import DataContext

    old = DataContext.get_current()
    DataContext._set_current(_context())
    plans: dict[int, ScenePlan] = {}
    try:
        if jobs:
            items = [{"idx": i, "job": pickle.dumps(job)} for i, job in jobs.items()]
            # one scene per block: a block is what Ray retries or gives up, so a failure touches one scene only
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(_SceneStage, batch_size=1, batch_format="numpy", **args)
            for row in _stream(ds, capacity_timeout_s, "scenes"):
                i, out = int(row["idx"]), pickle.loads(row["payload"])
                if row["kind"] == "plan":
                    plans[i] = out
                    if on_plan is not None:
                        on_plan(out)
                else:
                    finish(i, out)
        if plans:
            chunk_rows = [
                {"idx": i, "k": k, "plan": pickle.dumps(plan)}
                for i, plan in plans.items()
                for k in range(plan.n_chunks)
            ]
            ds = ray.data.from_items(chunk_rows, override_num_blocks=len(chunk_rows))
            ds = ds.map_batches(_ChunkStage, batch_size=1, batch_format="numpy", **args)
            metas: dict[int, dict[int, Any]] = {i: {} for i in plans}
            datas: dict[int, dict[int, bytes]] = {i: {} for i in plans}
            for row in _stream(ds, capacity_timeout_s, "chunks"):
                i, k = int(row["idx"]), int(row["k"])
                metas[i][k], datas[i][k] = pickle.loads(row["meta"]), row["data"]
            # the reduce keyed by scene is a third pass, not groupby().map_groups(): the shuffle's tasks need CPUs
            # that the reduce actors, placed as soon as the chunk actors leave, hold (measured: it hangs on 2 CPUs)
            reduce_rows = []
            for i, plan in plans.items():
                lost = {"worker": "", "attempt": max_attempts, "error": f"worker lost {max_attempts} times (Ray Data)"}
                m = [metas[i].get(k, lost) for k in range(plan.n_chunks)]  # a chunk Ray gave up on: reported failed
                d = [datas[i].get(k, pickle.dumps(None)) for k in range(plan.n_chunks)]
                reduce_rows.append({"idx": i, "payload": pickle.dumps((plan, m, d))})
                del metas[i], datas[i]
            ds = ray.data.from_items(reduce_rows, override_num_blocks=len(reduce_rows))
            ds = ds.map_batches(_ReduceStage, batch_size=1, batch_format="numpy", **args)
            for row in _stream(ds, capacity_timeout_s, "reduce"):
                finish(int(row["idx"]), pickle.loads(row["payload"]))
    except TimeoutError as e:
        log.error("%s; failing the %d scenes that wait", e, len(scene_uris) - len(results))
        for i in range(len(scene_uris)):
            if i not in results:
                finish(i, failed(i, 0, str(e)))
    finally:
        DataContext._set_current(old)
    for i in range(len(scene_uris)):  # blocks Ray Data gave up on: their worker died max_attempts times
        if i not in results:
            finish(i, failed(i, max_attempts, f"worker lost: no result after {max_attempts} attempts (Ray Data)"))
    assert len(results) == len(scene_uris)
    return [results[i] for i in range(len(scene_uris))]

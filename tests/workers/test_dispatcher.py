"""ActorDispatcher with several calls in flight per actor: calls overlap on one actor, spread over actors, and an
actor lost with two calls re-queues both, each value yielding exactly once."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from workers.reconstruct import ActorDispatcher  # noqa: E402


@ray.remote(num_cpus=1, max_concurrency=2)
class Sleeper:
    def ready(self) -> str:
        return ""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def work(self, value: int, seconds: float) -> tuple[int, float, float, int]:
        t0 = time.time()
        time.sleep(seconds)
        return value, t0, time.time(), os.getpid()


def _run(values: list[int], seconds: float, size: int, slots: int, on_call: Any = None) -> dict[int, Any]:
    pool = ActorDispatcher(Sleeper.remote, size, max_attempts=3, slots=slots)
    out: dict[int, Any] = {}

    def call(actor: Any, value: int, attempt: int) -> Any:
        if on_call is not None:
            on_call(actor, value, attempt)
        return actor.work.remote(value, seconds)

    with pool:
        for value, result in pool.map_unordered(call, values, lambda v, a, e: ("failed", a, e)):
            assert value not in out, f"{value} yielded twice"
            out[value] = result
    return out


def test_two_calls_overlap_on_one_actor(ray_local) -> None:
    out = _run([0, 1], 1.0, size=1, slots=2)
    (_, s0, e0, p0), (_, s1, e1, p1) = out[0], out[1]
    assert p0 == p1  # one actor
    assert max(s0, s1) < min(e0, e1)  # ran at the same time
    one = _run([0, 1], 1.0, size=1, slots=1)
    (_, s0, e0, _), (_, s1, e1, _) = one[0], one[1]
    assert max(s0, s1) >= min(e0, e1) - 0.05  # one slot: one after the other


def test_calls_go_to_the_least_busy_actor(ray_local) -> None:
    out = _run([0, 1], 0.5, size=2, slots=2)
    assert out[0][3] != out[1][3]  # two actors, one call each, not both on the first


def test_an_actor_lost_with_two_calls_requeues_both(ray_local) -> None:
    killed: list[int] = []

    def kill_after_second_dispatch(actor: Any, value: int, attempt: int) -> None:
        if value == 1 and attempt == 1:
            # both calls are on this actor now (size 1, slots 2): kill it for good once the second is sent
            time.sleep(0.2)
            killed.append(value)
            ray.kill(actor, no_restart=True)

    out = _run([0, 1, 2], 0.5, size=1, slots=2, on_call=kill_after_second_dispatch)
    assert killed and sorted(out) == [0, 1, 2]
    assert all(r[0] != "failed" for r in out.values()), out

"""A batch over a multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a node lost mid-batch never hangs
it; every scene ends done, or failed with the reason, within a bound."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from quantvggt import synth  # noqa: E402
from quantvggt.options import ReconstructionOptions  # noqa: E402

MODEL = "vggt-tiny-synthetic"
OPTIONS = ReconstructionOptions(max_points=200, images="none", database=False, ply=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = synth.main(tmp_path_factory.mktemp("multinode"), scenes=4, frames=3, seed=3, size=(112, 84))
    return [str(p) for p in sorted(root.iterdir()) if p.is_dir()]


def _node_of(actor) -> str:
    from ray._private import state

    return state.actors(actor_id=actor._actor_id.hex())["Address"]["NodeID"]


def test_a_lost_node_mid_batch_retries_its_scene_on_the_other(cluster, scenes: list[str], tmp_path: Path) -> None:
    from workers.reconstruct import run_scenes

    c, nodes = cluster
    removed: list[str] = []

    def lose_the_first_node(actor, scene: str, attempt: int) -> None:
        if not removed:
            node_id = _node_of(actor)
            [node] = [n for n in nodes if n.node_id == node_id]
            removed.append(scene)
            c.remove_node(node)  # the scene in flight there is lost with it

    t0 = time.monotonic()
    results = run_scenes(
        scenes, MODEL, str(tmp_path / "out"), OPTIONS, num_workers=2, on_dispatch=lose_the_first_node,
        capacity_timeout_s=60,
    )  # fmt: skip
    took = time.monotonic() - t0
    by = {r.source: r for r in results}
    assert len(results) == len(scenes) and removed
    assert all(r.status == "done" for r in results), {r.scene: r.error for r in results}
    assert by[removed[0]].attempt == 2  # dispatched again, on the node that is left
    survivor = {r.worker.rpartition("@")[2] for r in results if r.source != removed[0]}
    assert len(survivor) >= 1 and all(len(s) == 8 for s in survivor)  # workers are named by their Ray node
    assert took < 240, took


def test_no_capacity_left_fails_every_waiting_scene_with_the_reason(cluster, scenes: list[str], tmp_path: Path) -> None:
    from workers.reconstruct import run_scenes

    c, nodes = cluster
    gone: list[bool] = []

    def lose_every_node(actor, scene: str, attempt: int) -> None:
        if not gone:
            gone.append(True)
            for n in nodes:
                c.remove_node(n)

    t0 = time.monotonic()
    results = run_scenes(
        scenes, MODEL, str(tmp_path / "out"), OPTIONS, num_workers=2, on_dispatch=lose_every_node,
        capacity_timeout_s=10,
    )  # fmt: skip
    assert time.monotonic() - t0 < 120
    assert len(results) == len(scenes) and all(r.status == "failed" for r in results)
    assert all("no Ray worker could be placed" in r.error or "worker lost" in r.error for r in results), [
        r.error for r in results
    ]

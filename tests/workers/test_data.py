"""The reconstruct fan-out on Ray Data (workers/data.py): the same results and guarantees as the dispatcher."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from quantvggt import synth  # noqa: E402
from quantvggt.options import ReconstructionOptions  # noqa: E402

MODEL = "vggt-tiny-synthetic"
# 12 frames over a 6-frame single pass: chunks [0-5], [4-9], [6-11]; the 3-frame scenes run whole
OPTIONS = ReconstructionOptions(max_frames=6, overlap=2, max_points=300, images="none", database=False, ply=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three small scenes (one pass) and a 12-frame one (chunked)."""
    root = tmp_path_factory.mktemp("data")
    synth.main(root / "small", scenes=3, frames=3, seed=3, size=(112, 84))
    synth.make_scene(root / "big", 5, 12, 112, 84, "arc")
    return [str(p) for p in sorted((root / "small").iterdir()) if p.is_dir()] + [str(root / "big")]


def _rows(results) -> list[tuple]:
    return [(r.scene, r.status, r.images, r.points, r.error) for r in results]


def test_same_results_as_the_dispatcher(ray_local, scenes: list[str], tmp_path: Path) -> None:
    from workers.data import run_scenes_data
    from workers.reconstruct import run_scenes

    plans, seen = [], []
    data = run_scenes_data(scenes, MODEL, str(tmp_path / "data"), OPTIONS, num_workers=2, on_plan=plans.append,
                           on_result=seen.append)  # fmt: skip
    disp = run_scenes(scenes, MODEL, str(tmp_path / "disp"), OPTIONS, num_workers=2)
    assert _rows(data) == _rows(disp)  # input order, same images and points
    assert [r.status for r in data] == ["done"] * 4 and [r.images for r in data] == [3, 3, 3, 12]
    assert [p.job.name for p in plans] == ["big"]
    assert sorted(r.scene for r in seen) == sorted(r.scene for r in data)  # on_result once per scene
    import json

    report = json.loads((tmp_path / "data" / "big" / "report.json").read_text())
    assert report["chunking"]["chunks"] == 3 and report["images_unregistered"] == []
    assert all(c["worker"] for c in report["chunking"]["per_chunk"])


def test_a_bad_scene_fails_with_the_reason_others_go_on(ray_local, scenes: list[str], tmp_path: Path) -> None:
    from workers.data import run_scenes_data

    bad = tmp_path / "in" / "empty"
    bad.mkdir(parents=True)
    (bad / "notes.txt").write_text("no images here")
    missing = str(tmp_path / "in" / "missing")
    results = run_scenes_data([scenes[0], str(bad), missing, scenes[1]], MODEL, str(tmp_path / "out"), OPTIONS)
    assert [r.status for r in results] == ["done", "failed", "failed", "done"], [r.error for r in results]
    assert all(r.error for r in results[1:3]) and results[1].scene == "empty" and results[2].scene == "missing"


def test_a_setup_failure_fails_every_scene_without_retries(ray_local, scenes: list[str], tmp_path: Path) -> None:
    from workers.data import run_scenes_data

    t0 = time.monotonic()
    results = run_scenes_data(scenes, str(tmp_path / "no-such-model"), str(tmp_path / "out"), OPTIONS, num_workers=2)
    assert [r.status for r in results] == ["failed"] * len(scenes)
    assert all(r.error.startswith("worker setup failed:") and "no-such-model" in r.error for r in results)
    assert all(r.attempt == 1 for r in results)  # kept by the actor, never raised: Ray Data has nothing to retry
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_killed_worker_s_scene_is_retried(ray_local, tmp_path: Path) -> None:
    """A worker process killed mid-scene: Ray restarts it and re-runs its block; every scene done, once."""
    import os
    import signal

    from ray._private import state

    from workers.data import run_scenes_data

    root = synth.main(tmp_path / "in", scenes=6, frames=3, seed=5, size=(112, 84))
    scenes = [str(p) for p in sorted(root.iterdir()) if p.is_dir()]
    killed: list[int] = []

    def kill_the_other(result) -> None:  # the other worker, busy with a scene (tried on each result until one is)
        if killed:
            return
        mine = int(result.worker.split("@")[0].rpartition(":")[2])
        for a in state.actors().values():
            if "MapWorker" in str(a.get("ActorClassName")) and a.get("State") == "ALIVE" and a.get("Pid") != mine:
                killed.append(a["Pid"])
                os.kill(a["Pid"], signal.SIGKILL)
                return

    seen = []
    results = run_scenes_data(scenes, MODEL, str(tmp_path / "out"), OPTIONS, num_workers=2,
                              on_result=lambda r: (seen.append(r), kill_the_other(r)))  # fmt: skip
    assert killed, "no second worker to kill"
    assert [r.status for r in results] == ["done"] * 6, _rows(results)
    assert len(seen) == 6 and len({r.scene for r in seen}) == 6  # none lost or duplicated


def test_a_lost_node_mid_batch_ends_every_scene_within_a_bound(cluster, tmp_path: Path) -> None:
    from workers.data import run_scenes_data

    c, nodes = cluster
    root = synth.main(tmp_path / "in", scenes=6, frames=3, seed=4, size=(112, 84))
    scenes = [str(p) for p in sorted(root.iterdir()) if p.is_dir()]
    removed: list[str] = []

    def lose_a_node(result) -> None:  # after the first result: the other scenes are queued or in flight
        if not removed:
            removed.append(result.worker)
            c.remove_node(nodes[0])

    t0 = time.monotonic()
    results = run_scenes_data(scenes, MODEL, str(tmp_path / "out"), OPTIONS, num_workers=2, on_result=lose_a_node,
                              capacity_timeout_s=30)  # fmt: skip
    took = time.monotonic() - t0
    assert removed and len(results) == len(scenes)
    assert [r.source for r in results] == scenes  # one row per scene, input order
    assert all(r.status == "done" or (r.status == "failed" and r.error) for r in results), _rows(results)
    assert took < 240, took


def test_no_capacity_left_fails_every_waiting_scene_with_the_reason(cluster, tmp_path: Path) -> None:
    """Every node lost: Ray Data would wait for room for ever; the driver's capacity_timeout_s bounds it."""
    from workers.data import run_scenes_data

    c, nodes = cluster
    root = synth.main(tmp_path / "in", scenes=6, frames=3, seed=4, size=(112, 84))
    scenes = [str(p) for p in sorted(root.iterdir()) if p.is_dir()]
    gone: list[bool] = []

    def lose_every_node(result) -> None:
        if not gone:
            gone.append(True)
            for n in nodes:
                c.remove_node(n)

    t0 = time.monotonic()
    results = run_scenes_data(scenes, MODEL, str(tmp_path / "out"), OPTIONS, num_workers=2,
                              on_result=lose_every_node, capacity_timeout_s=10)  # fmt: skip
    took = time.monotonic() - t0
    assert len(results) == len(scenes) and [r.source for r in results] == scenes
    failed = [r for r in results if r.status == "failed"]
    assert failed and all("no Ray worker could be placed" in r.error or "worker lost" in r.error for r in failed)
    assert all(r.status in ("done", "failed") for r in results)
    assert took < 120, took


class _Sleep:
    """A callable-class UDF that sleeps; rows say when and where it ran."""

    def __call__(self, batch: dict) -> dict:
        import os

        import numpy as np

        t0 = time.time()
        time.sleep(1.0)
        return {
            "i": batch["i"],
            "start": np.array([t0]),
            "end": np.array([time.time()]),
            "pid": np.array([os.getpid()]),
        }


@pytest.mark.parametrize("in_flight", [1, 2])
def test_in_flight_calls_share_one_ray_data_actor(ray_local, in_flight: int) -> None:
    """The stages' actor pool (``_map_args``) runs ``in_flight`` calls at once on one actor: two 1 s calls overlap
    with 2, and run one after the other with 1."""
    import ray.data

    from workers.data import _map_args

    args = _map_args(1, 1, 1, MODEL, None, in_flight)
    ds = ray.data.from_items([{"i": 0}, {"i": 1}], override_num_blocks=2)
    rows = ds.map_batches(_Sleep, batch_size=1, compute=args["compute"], num_cpus=1).take_all()
    (a, b) = sorted(rows, key=lambda r: r["start"])
    assert a["pid"] == b["pid"]  # one actor
    if in_flight == 2:
        assert b["start"] < a["end"]  # ran at the same time
    else:
        assert b["start"] >= a["end"] - 0.05

"""quantvggt.predict: a model shared by threads runs one forward pass at a time, and says how long each call waited."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from quantvggt.options import ReconstructionOptions
from quantvggt.predict import OneForwardAtATime, predict_frames, scan_scene
from tests.conftest import sane_tiny_model


class _Slow(torch.nn.Module):
    """Sleeps in forward and records how many passes ran at once."""

    image_size = 56

    def __init__(self) -> None:
        super().__init__()
        self.running = self.most = 0
        self.guard = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.3)
        with self.guard:
            self.running -= 1
        return x


def test_forward_passes_run_one_at_a_time_and_each_thread_sees_its_own_wait() -> None:
    inner = _Slow()
    model = OneForwardAtATime(inner)
    waits: dict[int, float] = {}

    def call(i: int) -> None:
        model(torch.zeros(1))
        waits[i] = model.waited_s

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inner.most == 1  # never two passes at once
    assert model.image_size == 56  # attributes read through to the wrapped model
    assert min(waits.values()) < 0.1 and max(waits.values()) > 0.2  # the second waited for the first's 0.3 s pass
    assert model.waited_s == 0.0  # this (main) thread never called it


def test_predictions_report_the_wait_apart_from_the_model(synth_scenes: Path) -> None:
    model = OneForwardAtATime(sane_tiny_model())
    scene = sorted(p for p in synth_scenes.iterdir() if p.is_dir())[0]
    paths, _ = scan_scene(scene)
    opts = ReconstructionOptions()
    reports: list[dict[str, float]] = []

    def call() -> None:
        reports.append(predict_frames(model, paths, opts).report["timings_s"])

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["model"] > 0 for r in reports)
    waited = sorted(r.get("wait", 0.0) for r in reports)
    # one call may have loaded its images while the other ran, but one of the two passes waited for the other
    assert waited[-1] > 0.3 * min(r["model"] for r in reports), reports
    solo = predict_frames(model, paths, opts).report["timings_s"]
    assert "wait" not in solo or solo["wait"] < 0.01

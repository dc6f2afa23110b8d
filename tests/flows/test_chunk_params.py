"""Large-scene flow parameters: checked in one line before any work, and every one the deployments set exists."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from flows.params import ParameterError, check_cpus_per_worker, reconstruction_options

REPO = Path(__file__).resolve().parents[2]


def test_chunk_parameters_merge_into_options() -> None:
    merged = reconstruction_options({"max_points": 300}, chunk_size=8, overlap=2, anchors=None, memory_budget_mb=64.0)
    assert merged == {"max_points": 300, "chunk_size": 8, "overlap": 2, "memory_budget_mb": 64.0}
    assert reconstruction_options({"chunk_size": 8}, chunk_size=8) == {"chunk_size": 8}  # the same value twice: fine


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"chunk_size": 1}, "chunk_size must be >= 2"),
        ({"chunk_size": 2.5}, "chunk_size must be a whole number"),
        ({"chunk_size": 8, "overlap": 8}, "overlap must be smaller than the chunk size"),
        ({"chunking": "anchors", "chunk_size": 8, "anchors": 9}, "anchors must be fewer than the chunk size"),
        ({"memory_budget_mb": 0.0}, "memory_budget_mb must be > 0"),
        ({"memory_budget_mb": float("nan")}, "memory_budget_mb must be a finite number"),
        ({"chunking": "tiles"}, "chunking must be"),
    ],
)
def test_bad_chunk_parameters_fail_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message) as err:
        reconstruction_options(None, **params)
    assert "\n" not in str(err.value)


def test_conflicting_and_unknown_parameters_are_refused() -> None:
    with pytest.raises(ParameterError, match="chunk_size given twice"):
        reconstruction_options({"chunk_size": 16}, chunk_size=8)
    with pytest.raises(ParameterError, match="unknown chunking parameter"):
        reconstruction_options(None, tile=3)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ParameterError, match="cpus_per_worker"):
            check_cpus_per_worker(bad)
    assert check_cpus_per_worker(2) == 2


def test_deployments_set_only_flow_parameters() -> None:
    from flows.reconstruct import reconstruct, reconstruct_nightly

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows = {"reconstruct": reconstruct, "reconstruct-nightly": reconstruct_nightly}
    for dep in spec["deployments"]:
        if dep["name"] in flows:
            accepted = set(inspect.signature(flows[dep["name"]].fn).parameters)
            assert set(dep["parameters"]) <= accepted, dep["name"]
            assert {"chunk_size", "overlap", "anchors", "memory_budget_mb", "cpus_per_worker"} <= set(dep["parameters"])


def test_submit_refuses_bad_chunk_options_before_anything_is_queued(capsys) -> None:
    from quantvggt import cli

    argv = ["submit", "s3://b/inbox/a", "--checkpoint", "s3://b/q/latest", "--out", "s3://b/r"]
    assert cli.main([*argv, "--chunk-size", "8", "--overlap", "8"]) == 2
    err = capsys.readouterr().err
    assert "overlap must be smaller than the chunk size (8), got 8" in err and len(err.strip().splitlines()) == 1
    assert cli.main([*argv, "--cpus-per-worker", "0"]) == 2
    assert "cpus_per_worker must be a whole number >= 1, got 0" in capsys.readouterr().err

"""Options declared once (quantvggt.options): checked in one line before any work, the same in the CLI, the flows,
prefect.yaml and the Prefect parameter form."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from quantvggt.options import BatchOptions, ExportOptions, ReconstructionOptions, add_arguments, coerce, from_args

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"chunk_size": 1}, "chunk_size must be >= 2"),
        ({"chunk_size": 2.5}, "chunk_size must be a whole number"),
        ({"chunk_size": 8, "overlap": 8}, "overlap must be smaller than the chunk size"),
        ({"chunking": "anchors", "chunk_size": 8, "anchors": 9}, "anchors must be fewer than the chunk size"),
        ({"memory_budget_mb": 0.0}, "memory_budget_mb must be > 0"),
        ({"memory_budget_mb": float("nan")}, "memory_budget_mb must be a finite number"),
        ({"chunking": "tiles"}, "chunking must be one of"),
        ({"tile": 3}, "unknown option"),
    ],
)
def test_bad_options_fail_in_one_line(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        coerce(ReconstructionOptions, params)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0, 1.5, True, "2"])
def test_batch_options_are_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="cpus_per_worker must be a whole number"):
        BatchOptions(cpus_per_worker=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed_failures must be >= 0"):
        BatchOptions(allowed_failures=-1)


def test_every_cli_flag_is_a_field_and_round_trips() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ReconstructionOptions)
    defaults = from_args(ReconstructionOptions, parser.parse_args([]))
    assert defaults == ReconstructionOptions()  # the CLI's defaults are the dataclass's, declared once
    args = parser.parse_args(["--no-tracks", "--camera-tol", "0.2", "--max-frames", "8", "--export", "nerfstudio"])
    opts = from_args(ReconstructionOptions, args)
    assert (opts.tracks, opts.shared_camera_tol, opts.max_frames, opts.formats) == (False, 0.2, 8, ["nerfstudio"])
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests <= {f.name for f in dataclasses.fields(ReconstructionOptions)}
    assert {"chunk_size", "overlap", "memory_budget_mb", "ba", "ply"} <= dests


def test_cli_choices_come_from_the_field_types() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ExportOptions)
    with pytest.raises(SystemExit):
        parser.parse_args(["--camera", "fisheye"])


def test_prefect_validates_the_options_as_one_typed_parameter() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.reconstruct import reconstruct, reconstruct_nightly

    for flow in (reconstruct, reconstruct_nightly):
        schema = parameter_schema(flow.fn).model_dump()
        assert set(schema["properties"]) >= {"options", "batch"}
        assert "max_frames" not in schema["properties"]  # nested, not flattened into the flow signature
    validated = reconstruct.validate_parameters(
        {"scenes": ["x"], "checkpoint": "c", "out": "/o", "options": {"max_frames": 8}, "batch": {"num_workers": 1}}
    )
    assert validated["options"] == ReconstructionOptions(max_frames=8)
    assert validated["batch"] == BatchOptions(num_workers=1)
    with pytest.raises(Exception, match="max_frames must be >= 2"):
        reconstruct.validate_parameters({"scenes": ["x"], "checkpoint": "c", "out": "/o", "options": {"max_frames": 1}})


def test_deployments_nest_the_options() -> None:
    from flows.reconstruct import reconstruct, reconstruct_nightly

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows = {"reconstruct": reconstruct, "reconstruct-nightly": reconstruct_nightly}
    for dep in spec["deployments"]:
        if dep["name"] in flows:
            params = dep["parameters"]
            assert set(params) <= set(inspect.signature(flows[dep["name"]].fn).parameters), dep["name"]
            coerce(ReconstructionOptions, params.get("options"))  # every nested key is a field, every value valid
            coerce(BatchOptions, params.get("batch"))
            assert {"num_workers", "cpus_per_worker"} <= set(params["batch"])


def test_submit_refuses_bad_options_before_anything_is_queued(capsys) -> None:
    from quantvggt import cli

    argv = ["submit", "s3://b/inbox/a", "--checkpoint", "s3://b/q/latest", "--out", "s3://b/r"]
    assert cli.main([*argv, "--chunk-size", "8", "--overlap", "8"]) == 2
    err = capsys.readouterr().err
    assert "overlap must be smaller than the chunk size (8), got 8" in err and len(err.strip().splitlines()) == 1
    assert cli.main([*argv, "--cpus-per-worker", "0"]) == 2
    assert "cpus_per_worker must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_kernel_options_travel_as_one_checked_field_and_the_loader_applies_them() -> None:
    import torch

    from quantvggt.quant.load import load_model

    with pytest.raises(ValueError, match="KernelOptions.cpu_gemm must be one of"):
        BatchOptions(kernels={"cpu_gemm": "bogus"})
    assert BatchOptions(kernels={"float_dtype": "bf16"}).kernels["float_dtype"] == "bf16"  # all fields, JSON-safe
    assert next(load_model("demo-random", device="cpu").parameters()).dtype == torch.float32  # None: as loaded
    model = load_model("demo-random", device="cpu", kernels={"float_dtype": "bf16"})
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 56, 56))
    assert torch.isfinite(out["depth"].float()).all()
    load_model("demo-random", device="cpu", kernels={"float_dtype": "fp32"})  # the process options back to fp32

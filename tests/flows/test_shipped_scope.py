"""One shipped quantization scope: the CLI, the quantize flow, its deployment (prefect.yaml) and the demo agree."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import yaml

from quantvggt.quant import get_recipe
from quantvggt.quant.config import SHIPPED_SCOPE, recipe_overrides

REPO = Path(__file__).resolve().parents[2]


def test_the_deployed_quantize_flow_ships_the_cli_and_demo_scope() -> None:
    from flows import demo
    from flows.quantize import quantize
    from quantvggt.commands import quantize as quantize_command

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [dep] = [d for d in spec["deployments"] if d["name"] == "quantize"]
    deployed = dep["parameters"].get("scope", inspect.signature(quantize.fn).parameters["scope"].default)
    assert deployed is None or tuple(deployed) == SHIPPED_SCOPE  # None: the flow's default, SHIPPED_SCOPE
    assert "list(SHIPPED_SCOPE) if scope is None" in inspect.getsource(quantize.fn)
    parser = argparse.ArgumentParser()
    quantize_command.configure(parser)
    cli = parser.parse_args(["--model", "m", "--calibration", "c", "--out", "o"]).scope
    assert tuple(cli) == SHIPPED_SCOPE
    assert "scope=" not in inspect.getsource(demo.main)  # the demo runs the flow's default
    config = get_recipe(dep["parameters"]["recipe"], **recipe_overrides(0, list(SHIPPED_SCOPE), None))
    assert config.scope == SHIPPED_SCOPE and "dpt_heads" in config.scope  # 3.61x on the small model, not 1.56x

"""infra/cluster templates: nothing points at a made-up host; an unset repository URL stops `ray up` in one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "infra" / "cluster"


def test_templates_name_no_made_up_host() -> None:
    for template in CLUSTER.glob("*.yaml"):
        assert "example.invalid" not in template.read_text(), template


def test_unset_repository_url_stops_the_setup_in_one_line(tmp_path: Path) -> None:
    setup = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())["setup_commands"][0]
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "-c", setup], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        "infra/cluster/ray-cluster.yaml: set QUANTVGGT_GIT_URL in setup_commands to your quantvggt repository"
        " before ray up\n"
    )
    assert not (tmp_path / "quantvggt").exists()


def test_kuberay_images_are_placeholders_to_set() -> None:
    spec = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())["spec"]
    containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
    containers += [c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert {c["image"] for c in containers} == {"SET-ME/your-registry/quantvggt:latest"}

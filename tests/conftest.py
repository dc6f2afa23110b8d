"""Shared fixtures: the repository's test fixtures (tests/fixtures) and small seeded models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantvggt.testing import tiny_config_dict

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
PARITY = FIXTURES / "vggt-tiny-parity"  # upstream reference outputs, committed so every clone has them
SPEC_1B = FIXTURES / "vggt-1b-state-dict.json"  # the official checkpoint key -> shape map


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    """A seeded random tiny VGGT in eval mode."""
    from quantvggt.model import VGGT, VGGTConfig

    torch.manual_seed(0)
    return VGGT(VGGTConfig.from_dict(tiny_config_dict())).eval()


def require(path: Path) -> Path:
    """Fail loudly when a committed fixture is missing."""
    if not path.exists():
        pytest.fail(f"fixture {path} is missing (it is committed under tests/fixtures)")
    return path


@pytest.fixture(scope="session")
def s3_endpoint() -> object:
    """An S3 HTTP endpoint for the whole session: moto in server mode on 127.0.0.1 by default.

    ``QUANTVGGT_TEST_S3_ENDPOINT=http://host:port`` runs the S3 tests against that server instead (a real
    S3-compatible server, e.g. SeaweedFS: infra/README.md), with the AWS_* credentials of the environment.
    """
    import os

    if real := os.environ.get("QUANTVGGT_TEST_S3_ENDPOINT"):
        if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
            pytest.fail("QUANTVGGT_TEST_S3_ENDPOINT is set: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for it too")
        old_endpoint = os.environ.get("QUANTVGGT_S3_ENDPOINT")
        os.environ["QUANTVGGT_S3_ENDPOINT"] = real
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        yield real
        if old_endpoint is None:
            os.environ.pop("QUANTVGGT_S3_ENDPOINT", None)
        else:
            os.environ["QUANTVGGT_S3_ENDPOINT"] = old_endpoint
        return

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    old = {
        k: os.environ.get(k)
        for k in ("QUANTVGGT_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        QUANTVGGT_S3_ENDPOINT=url,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def sane_tiny_model(seed: int = 0) -> torch.nn.Module:
    """Tiny random VGGT whose camera head outputs near-identity poses and ~57 deg FoV (valid cameras)."""
    from quantvggt.model import VGGT, VGGTConfig

    torch.manual_seed(seed)
    m = VGGT(VGGTConfig.from_dict(tiny_config_dict())).eval()
    fc2 = m.camera_head.pose_branch.fc2
    with torch.no_grad():
        fc2.weight.mul_(0.01)
        fc2.bias.copy_(
            torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]) / 4
        )  # 4 refinement iterations add up
    return m


@pytest.fixture(scope="session")
def synth_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic scenes (10 frames, 112x84) with ground truth."""
    from quantvggt import synth

    return synth.main(tmp_path_factory.mktemp("synth"), scenes=2, frames=6, seed=0, size=(112, 84))

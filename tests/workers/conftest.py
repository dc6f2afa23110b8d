"""Fixtures shared by the Ray worker tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def ray_local() -> Any:
    """A private local Ray of 2 CPUs (any Ray this process had is shut down first)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def cluster() -> Any:
    """A Ray cluster of 2 nodes of 1 CPU on this machine (the head runs no worker): ``(cluster, [node, node])``."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # another test module's local Ray: these tests need their own cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()

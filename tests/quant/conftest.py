"""A tiny VGGT with planted, VGGT-like activation outliers (random weights lack them)."""

from __future__ import annotations

import pytest
import torch

from quantvggt.model import VGGT, VGGTConfig
from tests.conftest import tiny_config_dict


def outlier_model(seed: int = 0) -> VGGT:
    """Tiny VGGT whose blocks matter (layer scale 0.5) with huge camera/register tokens and 3 outlier channels per norm."""
    torch.manual_seed(seed)
    m = VGGT(VGGTConfig.from_dict(tiny_config_dict())).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.aggregator.named_parameters():
            if n.endswith("gamma"):
                p.fill_(0.5)
        m.aggregator.camera_token.copy_(torch.randn(m.aggregator.camera_token.shape, generator=g) * 8)
        m.aggregator.register_token.copy_(torch.randn(m.aggregator.register_token.shape, generator=g) * 8)
        for blk in list(m.aggregator.frame_blocks) + list(m.aggregator.global_blocks):
            idx = torch.randperm(64, generator=g)[:3]
            blk.norm1.weight[idx] *= 15
            blk.norm2.weight[idx] *= 15
    return m


@pytest.fixture
def planted() -> VGGT:
    """See :func:`outlier_model`."""
    return outlier_model()


def calib_batches(n: int, seed: int) -> list[torch.Tensor]:
    """``n`` random 3-frame 28x42 image batches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 3, 28, 42, generator=g) for _ in range(n)]

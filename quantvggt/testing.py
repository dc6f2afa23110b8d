"""Models with planted VGGT-like activation outliers, for tests and benchmarks of quantization.

Random weights lack VGGT's heavy-tailed special-token activations; these helpers plant them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantvggt.model import VGGT, VGGTConfig

TINY_CONFIG = Path(__file__).resolve().parent / "assets" / "vggt-tiny-config.json"


def tiny_config_dict(**aggregator: object) -> dict:
    """The parity fixture's tiny architecture (conv patch embed, width 64, depth 4), with aggregator overrides."""
    d = json.loads(TINY_CONFIG.read_text())
    d["aggregator"].update(aggregator)
    return d


def planted_outlier_model(
    seed: int = 0, token_scale: float = 8.0, channel_gain: float = 15.0, n_channels: int = 3
) -> VGGT:
    """Tiny VGGT whose blocks matter (layer scale 0.5), with large camera/register tokens and outlier channels."""
    torch.manual_seed(seed)
    m = VGGT(VGGTConfig.from_dict(tiny_config_dict())).eval()
    g = torch.Generator().manual_seed(seed + 1)
    agg = m.aggregator
    with torch.no_grad():
        for n, p in agg.named_parameters():
            if n.endswith("gamma"):
                p.fill_(0.5)
        agg.camera_token.copy_(torch.randn(agg.camera_token.shape, generator=g) * token_scale)
        agg.register_token.copy_(torch.randn(agg.register_token.shape, generator=g) * token_scale)
        width = agg.camera_token.shape[-1]
        for blk in list(agg.frame_blocks) + list(agg.global_blocks):
            idx = torch.randperm(width, generator=g)[:n_channels]
            blk.norm1.weight[idx] *= channel_gain
            blk.norm2.weight[idx] *= channel_gain
    return m

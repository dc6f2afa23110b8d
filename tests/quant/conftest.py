"""Quantization test fixtures."""

from __future__ import annotations

import pytest
import torch

from quantvggt.model import VGGT
from quantvggt.testing import planted_outlier_model


@pytest.fixture
def planted() -> VGGT:
    """Tiny VGGT with planted activation outliers (see :func:`quantvggt.testing.planted_outlier_model`)."""
    return planted_outlier_model()


def calib_batches(n: int, seed: int) -> list[torch.Tensor]:
    """``n`` random 3-frame 28x42 image batches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 3, 28, 42, generator=g) for _ in range(n)]

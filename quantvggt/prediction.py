"""What the model predicted for one scene (:class:`ScenePrediction`), shared by inference and the COLMAP export."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantvggt.images import ImageTransform


class SceneError(ValueError):
    """A scene cannot be reconstructed (e.g. fewer than 2 usable images)."""


@dataclass
class ScenePrediction:
    """Model outputs for one scene, in numpy, with the maps back to the original images."""

    scene: str
    names: list[str]
    original_sizes: list[tuple[int, int]]
    transforms: list[ImageTransform]
    extrinsics: np.ndarray  # [S, 3, 4] camera-from-world
    intrinsics: np.ndarray  # [S, 3, 3] in model pixels
    depth: np.ndarray  # [S, H, W]
    depth_conf: np.ndarray  # [S, H, W]
    world_points: np.ndarray | None  # [S, H, W, 3]
    world_points_conf: np.ndarray | None
    images: np.ndarray  # [S, H, W, 3] float in [0, 1]
    report: dict[str, Any] = field(default_factory=dict)

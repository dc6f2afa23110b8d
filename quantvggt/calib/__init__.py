"""Calibration data: samples (a few frames of one scene) drawn from scene folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from quantvggt.images import ImageLoadError, list_images, load_and_preprocess

log = logging.getLogger(__name__)


def pick_frames(n_images: int, k: int, seed: int | None = None) -> list[int]:
    """``k`` frame indices out of ``n_images``: evenly spaced (``seed=None``) or a seeded random sorted subset."""
    if n_images < 1:
        return []
    k = min(k, n_images)
    if seed is None:
        return sorted({int(round(i)) for i in np.linspace(0, n_images - 1, k)})
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_images, size=k, replace=False).tolist())


def folder_sample(folder: Union[str, Path], frames: int = 10, seed: int | None = None, mode: str = "crop", image_size: int = 518) -> dict:
    """One calibration sample from an image folder: ``{"id", "scene", "frame_ids", "images" [K,3,H,W]}``."""
    folder = Path(folder)
    paths = list_images(folder)
    if len(paths) < 2:
        raise ValueError(f"{folder}: needs at least 2 images for a calibration sample, found {len(paths)}")
    idx = pick_frames(len(paths), frames, seed)
    chosen = [paths[i] for i in idx]
    try:
        batch = load_and_preprocess(chosen, mode=mode, target_size=image_size)  # type: ignore[arg-type]
    except ImageLoadError as e:
        good = []
        for p in paths:
            try:
                load_and_preprocess([p])
                good.append(p)
            except ImageLoadError as bad:
                log.warning("calibration: skipping %s", bad)
        if len(good) < 2:
            raise ValueError(f"{folder}: fewer than 2 readable images") from e
        idx = pick_frames(len(good), frames, seed)
        chosen = [good[i] for i in idx]
        batch = load_and_preprocess(chosen, mode=mode, target_size=image_size)  # type: ignore[arg-type]
    names = [p.name for p in chosen]
    return {"id": f"{folder.name}:{','.join(names)}", "scene": str(folder), "frame_ids": names, "images": batch.images}


def folder_samples(folders: Sequence[Union[str, Path]], frames: int = 10, seed: int | None = None, mode: str = "crop", image_size: int = 518) -> list[dict]:
    """One calibration sample per folder (see :func:`folder_sample`)."""
    return [folder_sample(f, frames, seed, mode, image_size) for f in folders]

"""Calibration data: samples (a few frames of one scene) drawn from scene folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantvggt.images import load_and_preprocess, pick_frames, readable_images

__all__ = ["folder_sample", "folder_samples", "pick_frames"]


def folder_sample(
    folder: str | Path, frames: int = 10, seed: int | None = None, mode: str = "crop", image_size: int = 518
) -> dict:
    """One calibration sample from an image folder: ``{"id", "scene", "frame_ids", "images" [K,3,H,W]}``."""
    folder = Path(folder)
    good, _ = readable_images(folder)
    if len(good) < 2:
        raise ValueError(f"{folder}: needs at least 2 readable images for a calibration sample, found {len(good)}")
    chosen = [good[i] for i in pick_frames(len(good), frames, seed)]
    batch = load_and_preprocess(chosen, mode=mode, target_size=image_size)  # type: ignore[arg-type]
    names = [p.name for p in chosen]
    return {"id": f"{folder.name}:{','.join(names)}", "scene": str(folder), "frame_ids": names, "images": batch.images}


def folder_samples(
    folders: Sequence[str | Path],
    frames: int = 10,
    seed: int | None = None,
    mode: str = "crop",
    image_size: int = 518,
) -> list[dict]:
    """One calibration sample per folder (see :func:`folder_sample`)."""
    return [folder_sample(f, frames, seed, mode, image_size) for f in folders]

"""``images/``: the scene's images beside the model (absolute symlinks or copies), as COLMAP MVS and
Gaussian-splatting trainers expect them."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from quantvggt.colmap import ColmapResult
from quantvggt.export import register_writer
from quantvggt.options import ExportOptions

log = logging.getLogger(__name__)


def link_or_copy_images(sources: list[Path], names: list[str], folder: Path, mode: str) -> str:
    """Fill ``folder`` (the workspace's images/) with the source images as absolute symlinks or copies.

    Returns the mode used: a symlink that the filesystem refuses falls back to a copy.
    """
    folder.mkdir(parents=True, exist_ok=True)
    used = mode
    for src, name in zip(sources, names):
        src = Path(os.path.abspath(src))  # absolute, so the link survives the rename of the output folder
        dst = folder / name
        if used == "link":
            try:
                os.symlink(src, dst)
                continue
            except OSError as e:  # e.g. filesystems without symlinks
                log.warning("%s: cannot symlink (%s); copying the images instead", dst, e)
                used = "copy"
        shutil.copyfile(src, dst)
    return used


def write(result: ColmapResult, folder: Path, options: ExportOptions, sources: list[Path] | None) -> dict[str, Any]:
    """``folder/images`` as ``options.images`` asks; without known sources, none (said in the report)."""
    mode = options.images
    if mode != "none" and len(sources or []) != len(result.model.image_names):
        log.warning("%s: the source images are not known; no images/ folder written", folder.name)
        mode = "none (source images unknown)"
    elif mode != "none":
        mode = link_or_copy_images(list(sources or []), result.model.image_names, folder / "images", mode)
    return {"images": mode}


register_writer("images", write, enabled=lambda o: True)

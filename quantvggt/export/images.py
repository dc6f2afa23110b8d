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


def _exif_orientation(path: Path) -> int:
    """The EXIF orientation tag of an image file (1 = as stored; 1 when absent or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # the frame was read once already; an unreadable tag means no rotation was applied either
        return 1


def write_upright(src: Path, dst: Path) -> None:
    """Write ``src`` with its EXIF orientation applied to the pixels (and the tag dropped), in its own format.

    The model saw the frame upright (``images.open_image`` applies the tag) and the cameras are upright; COLMAP
    and Gaussian-splatting trainers read the stored pixels without the tag, so a linked original was rotated
    against its camera.
    """
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        fmt = "JPEG" if im.format in ("JPEG", "MPO") else (im.format or "PNG")
        icc = im.info.get("icc_profile")
        upright = ImageOps.exif_transpose(im)  # drops the orientation tag from the copy's EXIF
    kw: dict[str, Any] = {"exif": upright.getexif().tobytes()}
    if icc:
        kw["icc_profile"] = icc
    if fmt == "JPEG":
        kw["quality"] = 95  # re-encoded once; the pixels COLMAP reads must be the upright ones
    upright.save(dst, fmt, **kw)


def link_or_copy_images(
    sources: list[Path], names: list[str], folder: Path, mode: str, rotated: list[str] | None = None
) -> str:
    """Fill ``folder`` (the workspace's images/) with the source images as absolute symlinks or copies.

    Returns the mode used: a symlink that the filesystem refuses falls back to a copy. A source with an EXIF
    orientation other than 1 is written upright instead (:func:`write_upright`; its name goes to ``rotated``):
    its camera in the model is the upright one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    used = mode
    for src, name in zip(sources, names):
        src = Path(os.path.abspath(src))  # absolute, so the link survives the rename of the output folder
        dst = folder / name
        if _exif_orientation(src) != 1:
            write_upright(src, dst)
            if rotated is not None:
                rotated.append(name)
            continue
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
        rotated: list[str] = []
        mode = link_or_copy_images(list(sources or []), result.model.image_names, folder / "images", mode, rotated)
        if rotated:  # written upright, not linked: the cameras are upright
            return {"images": mode, "images_written_upright": rotated}
    return {"images": mode}


register_writer("images", write, enabled=lambda o: True)

"""Image loading and VGGT preprocessing, keeping the map from model pixels back to original pixels."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
TARGET_SIZE = 518
PATCH = 14


class ImageLoadError(ValueError):
    """An image file is missing, empty, corrupt or not an image."""


@dataclass(frozen=True)
class ImageTransform:
    """Affine map original -> model pixels: ``u = sx * x + ox``, ``v = sy * y + oy`` (continuous coordinates)."""

    sx: float
    sy: float
    ox: float
    oy: float

    def to_original(self, uv: np.ndarray) -> np.ndarray:
        """Map model pixel coordinates ``[..., 2]`` to original-image coordinates."""
        uv = np.asarray(uv, dtype=np.float64)
        return np.stack([(uv[..., 0] - self.ox) / self.sx, (uv[..., 1] - self.oy) / self.sy], axis=-1)

    def intrinsics_to_original(self, K: np.ndarray) -> np.ndarray:
        """Pinhole intrinsics in model pixels -> intrinsics in original pixels."""
        A_inv = np.array([[1 / self.sx, 0, -self.ox / self.sx], [0, 1 / self.sy, -self.oy / self.sy], [0, 0, 1]])
        return A_inv @ np.asarray(K, dtype=np.float64)

    def intrinsics_to_model(self, K: np.ndarray) -> np.ndarray:
        """Pinhole intrinsics in original pixels -> intrinsics in model pixels."""
        A = np.array([[self.sx, 0, self.ox], [0, self.sy, self.oy], [0, 0, 1]])
        return A @ np.asarray(K, dtype=np.float64)


@dataclass
class PreprocessedImages:
    """A batch ready for the model plus what is needed to map predictions back."""

    images: torch.Tensor  # [S, 3, H, W] in [0, 1]
    original_sizes: list[tuple[int, int]]  # (width, height) per image
    transforms: list[ImageTransform]
    names: list[str]


def open_image(source: str | Path | bytes, name: str = "") -> Image.Image:
    """Decode an image (path or bytes), apply EXIF orientation and composite alpha on white; RGB out."""
    label = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageLoadError(f"{label}: file is empty (0 bytes)")
            img = Image.open(io.BytesIO(source))
        else:
            p = Path(source)
            if not p.is_file():
                raise ImageLoadError(f"{label}: no such file")
            if p.stat().st_size == 0:
                raise ImageLoadError(f"{label}: file is empty (0 bytes)")
            img = Image.open(p)
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{label}: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{label}: corrupt or truncated image ({e})") from e
    if img.width < 1 or img.height < 1:
        raise ImageLoadError(f"{label}: image has no pixels")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def preprocess_image(
    img: Image.Image, mode: Literal["crop", "pad"] = "crop", target_size: int = TARGET_SIZE
) -> tuple[torch.Tensor, ImageTransform]:
    """Resize like upstream (518 px wide for crop; longest side 518 for pad; sides multiples of 14)."""
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if target_size % PATCH or target_size < PATCH:
        raise ValueError(f"target_size must be a positive multiple of {PATCH}, got {target_size}")
    width, height = img.size
    if mode == "pad" and height > width:
        new_h = target_size
        new_w = max(PATCH, round(width * (new_h / height) / PATCH) * PATCH)
    else:
        new_w = target_size
        new_h = max(PATCH, round(height * (new_w / width) / PATCH) * PATCH)
    t = _to_tensor(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    sx, sy = new_w / width, new_h / height
    ox = oy = 0.0
    if mode == "crop" and new_h > target_size:
        start = (new_h - target_size) // 2
        t = t[:, start : start + target_size]
        oy = -float(start)
    if mode == "pad":
        hp, wp = target_size - t.shape[1], target_size - t.shape[2]
        if hp > 0 or wp > 0:
            top, left = hp // 2, wp // 2
            t = F.pad(t, (left, wp - left, top, hp - top), value=1.0)
            ox, oy = float(left), float(top)
    return t, ImageTransform(sx, sy, ox, oy)


def load_and_preprocess(
    sources: Sequence[str | Path],
    mode: Literal["crop", "pad"] = "crop",
    target_size: int = TARGET_SIZE,
    names: Sequence[str] | None = None,
) -> PreprocessedImages:
    """Load image files and stack them, padding mixed sizes with white to a common size (centred)."""
    if not sources:
        raise ValueError("at least one image is required")
    names = list(names) if names is not None else [Path(s).name for s in sources]
    tensors, transforms, sizes = [], [], []
    for src, _name in zip(sources, names):
        img = open_image(src, name=str(src))
        sizes.append(img.size)
        t, tf = preprocess_image(img, mode, target_size)
        tensors.append(t)
        transforms.append(tf)
    H = max(t.shape[1] for t in tensors)
    W = max(t.shape[2] for t in tensors)
    out = []
    for i, t in enumerate(tensors):
        hp, wp = H - t.shape[1], W - t.shape[2]
        if hp or wp:
            top, left = hp // 2, wp // 2
            t = F.pad(t, (left, wp - left, top, hp - top), value=1.0)
            tf = transforms[i]
            transforms[i] = ImageTransform(tf.sx, tf.sy, tf.ox + left, tf.oy + top)
        out.append(t)
    if len({(t.shape[1], t.shape[2]) for t in tensors}) > 1:
        log.info("images had different preprocessed sizes; padded to %dx%d", W, H)
    return PreprocessedImages(torch.stack(out), sizes, transforms, names)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension, case-insensitive), in a stable sorted order."""
    folder = Path(folder)
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name
    )


def pick_frames(n_images: int, k: int, seed: int | None = None) -> list[int]:
    """``k`` frame indices out of ``n_images``: evenly spaced (``seed=None``) or a seeded random sorted subset."""
    if n_images < 1:
        return []
    k = min(k, n_images)
    if seed is None:
        return sorted({round(i) for i in np.linspace(0, n_images - 1, k)})
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_images, size=k, replace=False).tolist())


def readable_images(folder: str | Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Image files of ``folder`` that decode, and the skipped ones as ``{"name", "reason"}`` (each logged)."""
    folder = Path(folder)
    good, skipped = [], []
    for p in list_images(folder):
        try:
            open_image(p, name=p.name)
            good.append(p)
        except ImageLoadError as e:
            log.warning("%s: skipping %s", folder.name, e)
            skipped.append({"name": p.name, "reason": str(e)})
    return good, skipped

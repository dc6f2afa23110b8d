"""Image loading and VGGT preprocessing, keeping the map from model pixels back to original pixels."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# every extension Pillow reads as a photograph, plus HEIC/HEIF (decoded when pillow-heif is installed, else skipped
# with that reason): .bmp/.gif/.jfif/.heic frames used to be ignored without a word
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif",
)  # fmt: skip
_HEIF_EXTENSIONS = (".heic", ".heif")
_ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")  # a sequence of pictures, not one frame (multi-page TIFFs keep page 1)
# a JPEG's entropy-coded data ends at a marker: 0xFF then a byte that is not 0x00 (stuffing), 0xD0-0xD7 (restart
# markers, inside the data) or 0xFF (fill)
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
TARGET_SIZE = 518
PATCH = 14
# Refused from the header, before any pixel is decoded. 80 Mpx is above common cameras (61 Mpx full frame) and
# below Pillow's own decompression-bomb warning (89.5 Mpx); decoded RGB it is ~240 MB.
MAX_PIXELS = 80_000_000
# Beyond 20:1 the 518-px-wide resize explodes (a 1x12000 PNG of 129 bytes became a 3-Gpx tensor) and VGGT's
# 14-px patches see almost nothing of the short side; panoramas (<= ~10:1) pass.
MAX_ASPECT = 20.0
# A frame is blank when every channel spans at most this many 8-bit levels (flat white, fully transparent, black).
BLANK_TOLERANCE = 2
_DIRECT_MODES = {"1", "L", "P", "RGB", "RGBX", "YCbCr"}  # Pillow's conversion to RGB is exact for these
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


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


def check_image_header(width: int, height: int, label: str = "image") -> None:
    """Refuse sizes unsafe or pointless to decode: over ``MAX_PIXELS`` or more elongated than ``MAX_ASPECT``."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{label}: image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageLoadError(
            f"{label}: image is {width}x{height} = {width * height / 1e6:.1f} Mpx,"
            f" over the {MAX_PIXELS / 1e6:.0f} Mpx limit"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise ImageLoadError(
            f"{label}: image is {width}x{height}, aspect ratio {aspect:.0f}:1 is over the {MAX_ASPECT:.0f}:1 limit"
        )


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert any supported pixel mode to 8-bit RGB faithfully, or raise ``ImageLoadError`` saying why not."""
    mode = img.mode
    if mode in _16BIT_MODES or mode in ("I", "F"):
        if "transparency" in img.info:
            raise ImageLoadError(f"{label}: {mode} image with a transparent colour key is not supported")
        arr = np.asarray(img)
        if mode == "F":
            # float images have no defined range; [0, 1] is the only convention we can map without guessing
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ImageLoadError(
                    f"{label}: 32-bit float samples outside [0, 1] (range {arr.min():g}..{arr.max():g});"
                    " not a photograph we can convert faithfully"
                )
            arr8 = np.round(arr.astype(np.float64) * 255.0)
        else:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:
                raise ImageLoadError(f"{label}: {mode} samples outside 0..65535 (range {lo}..{hi}); not 16-bit data")
            # full-range /257 (65535 -> 255), not a per-image stretch: brightness stays comparable across a scene
            arr8 = np.round(arr.astype(np.float64) / 257.0)
        return Image.fromarray(arr8.astype(np.uint8), "L").convert("RGB")
    rgba_palette = mode == "P" and getattr(img.palette, "mode", "RGB") == "RGBA"
    if mode in _ALPHA_MODES or "transparency" in img.info or rgba_palette:
        if mode not in _ALPHA_MODES and mode not in ("1", "L", "P", "RGB"):
            raise ImageLoadError(f"{label}: {mode} image with a transparent colour key is not supported")
        return _composite_on_white(img)
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if not icc:
            return img.convert("RGB")  # device CMYK, no profile: Pillow's standard (255-C)(255-K)/255 mapping
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as e:  # a broken profile would give wrong colours: refuse rather than guess
            raise ImageLoadError(f"{label}: CMYK image whose ICC profile cannot be applied ({e})") from e
        assert out is not None
        return out
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    raise ImageLoadError(f"{label}: pixel mode {mode} is not supported (convert the image to RGB)")


def jpeg_is_complete(data: bytes) -> bool:
    """Whether JPEG ``data`` holds its whole image: markers well formed from SOI and an EOI after the last scan.

    Pillow decodes a JPEG whose second half is zeros without a word (zeros are valid entropy-coded data, and
    libjpeg's "premature end" is only a warning), so a camera file cut by a failed copy became a grey-smeared frame.
    Bytes after EOI (padding some cameras add) are allowed.
    """
    if data[:2] != b"\xff\xd8":
        return False
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return False
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next marker
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                return False
            pos = m.start()
    return pos + 2 <= n and data[pos : pos + 2] == b"\xff\xd9"


def _heif_opener() -> None:
    """Register pillow-heif's HEIC/HEIF opener, or refuse: Pillow alone cannot decode them."""
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("decoding it needs the pillow-heif package (pip install pillow-heif)") from e
    pillow_heif.register_heif_opener()


def open_image(source: str | Path | bytes, name: str = "") -> Image.Image:
    """Decode an image (path or bytes), apply EXIF orientation and composite alpha on white; RGB out.

    The size is checked from the header before decoding (:func:`check_image_header`); 16-bit grayscale maps to
    8 bits by /257, and pixel modes that cannot be converted faithfully are refused with ``ImageLoadError``.
    """
    label = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageLoadError(f"{label}: file is empty (0 bytes)")
            fp: io.BytesIO | Path = io.BytesIO(source)
        else:
            fp = Path(source)
            if not fp.is_file():
                raise ImageLoadError(f"{label}: no such file")
            if fp.stat().st_size == 0:
                raise ImageLoadError(f"{label}: file is empty (0 bytes)")
            if fp.suffix.lower() in _HEIF_EXTENSIONS:
                try:
                    _heif_opener()
                except ImportError as e:
                    raise ImageLoadError(f"{label}: HEIC/HEIF image: {e}") from None
        truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have turned it on: a cut file must fail
        try:
            with Image.open(fp) as raw:
                check_image_header(raw.width, raw.height, label)
                if raw.format in _ANIMATED_FORMATS and getattr(raw, "n_frames", 1) > 1:
                    raise ImageLoadError(
                        f"{label}: animated {raw.format} with {raw.n_frames} pictures; extract them as frames first"
                    )
                with warnings.catch_warnings():
                    # a decoder's warning about the data (truncated, corrupt) refuses the file; MAX_PIXELS is
                    # stricter than Pillow's bomb warning, and deprecations are about the API, not the file
                    warnings.simplefilter("error")
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    raw.load()
                if raw.format in ("JPEG", "MPO"):
                    data = source if isinstance(source, bytes) else Path(source).read_bytes()
                    if not jpeg_is_complete(data):
                        raise ImageLoadError(
                            f"{label}: corrupt or truncated image (JPEG data ends without its end marker)"
                        )
                img = ImageOps.exif_transpose(raw)  # a new image: usable after the file is closed
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{label}: refused before decoding, header claims too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{label}: not a recognised image format") from e
    except Exception as e:  # decoders raise many types on malformed input (OSError, SyntaxError, struct.error, ...)
        raise ImageLoadError(f"{label}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    if img.width < 1 or img.height < 1:
        raise ImageLoadError(f"{label}: image has no pixels")
    try:
        return _to_rgb(img, label)
    except ImageLoadError:
        raise
    except Exception as e:
        raise ImageLoadError(f"{label}: cannot convert {img.mode} image to RGB ({type(e).__name__}: {e})") from e


def frame_is_blank(img: Image.Image, tolerance: int = BLANK_TOLERANCE) -> bool:
    """Whether an RGB image (as from :func:`open_image`) is one flat colour, e.g. all white or fully transparent."""
    extrema = (img if img.mode == "RGB" else img.convert("RGB")).getextrema()
    return all(hi - lo <= tolerance for lo, hi in extrema)  # type: ignore[misc, operator]


def reference_index(paths: Sequence[str | Path]) -> int:
    """Index of the first frame that can serve as VGGT's reference (world) frame: readable and not blank.

    VGGT expresses every camera relative to frame 0, so a blank frame 0 would anchor the scene to nothing.
    Raises ``ImageLoadError`` when no frame qualifies.
    """
    for i, p in enumerate(paths):
        try:
            if not frame_is_blank(open_image(p, name=Path(p).name)):
                return i
        except ImageLoadError as e:
            log.warning("not a reference frame: %s", e)
    raise ImageLoadError(f"none of the {len(paths)} frames can be the reference: all are blank or unreadable")


def reference_first(paths: Sequence[str | Path]) -> list[Path]:
    """``paths`` with the first non-blank frame moved to the front (VGGT's reference frame), others in order."""
    out = [Path(p) for p in paths]
    i = reference_index(out)
    if i:
        log.info("%s is blank; using %s as the reference frame", out[0].name, out[i].name)
    return [out[i], *out[:i], *out[i + 1 :]]


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


def _broken_links(folder: Path) -> list[dict[str, str]]:
    """Symbolic links with an image extension whose target is missing, as skipped entries with the reason."""
    out = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_symlink() and not p.exists():
            out.append(
                {"name": p.name, "reason": f"{p.name}: broken symbolic link (its target {os.readlink(p)} is missing)"}
            )
    return out


def readable_images(folder: str | Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Image files of ``folder`` that decode, and the skipped ones as ``{"name", "reason"}`` (each logged).

    Skipped and said: files with an image extension that do not decode (or need a missing decoder), and symbolic
    links to missing files. Files without an image extension (notes, poses) are not frames and not listed.
    """
    folder = Path(folder)
    good, skipped = [], []
    try:
        broken = _broken_links(folder)
    except OSError:  # an unreadable folder: list_images below says so
        broken = []
    for entry in broken:
        log.warning("%s: skipping %s", folder.name, entry["reason"])
        skipped.append(entry)
    for p in list_images(folder):
        try:
            open_image(p, name=p.name)
            good.append(p)
        except Exception as e:  # one bad file never fails the scan; ImageLoadError is the expected case
            reason = str(e) if isinstance(e, ImageLoadError) else f"{p.name}: cannot read ({type(e).__name__}: {e})"
            log.warning("%s: skipping %s", folder.name, reason)
            skipped.append({"name": p.name, "reason": reason})
    return good, sorted(skipped, key=lambda s: s["name"])

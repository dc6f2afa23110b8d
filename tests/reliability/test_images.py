"""Image decoding reliability: every unusual or hostile file is either converted faithfully or refused with a reason.

How to add a case: append one ``Case`` row to ``CASES`` below --

    Case("my-case", make=lambda: <the file's bytes>, expect="regex the refusal reason must match")
    Case("my-case", make=lambda: ..., expect=lambda rgb: <assert on the decoded uint8 [H, W, 3] array>)

``png()`` builds a PNG byte by byte, so a header can claim any size; ``encode()`` saves a Pillow image. Every
case is decoded on its own (``test_case``) and all of them together go through the folder scan
(``test_scan_never_raises``), which must skip each refused file with its reason and never raise.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from quantvggt import images
from quantvggt.images import (
    ImageLoadError,
    frame_is_blank,
    load_and_preprocess,
    open_image,
    readable_images,
    reference_first,
)


def png(width: int, height: int, bit_depth: int = 8, color_type: int = 0, raw: bytes = b"") -> bytes:
    """A PNG whose IHDR says ``width x height`` and whose IDAT holds ``raw`` (filter bytes included)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """``img`` saved to bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


RAMP16 = np.linspace(0, 65535, 16 * 8).reshape(8, 16).astype(np.uint16)


def _gray_is(expected: np.ndarray, atol: int = 0) -> Callable[[np.ndarray], None]:
    def check(rgb: np.ndarray) -> None:
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        np.testing.assert_allclose(rgb[..., 0], expected, atol=atol)

    return check


def _colour_is(rgb_expected: tuple[int, int, int], atol: int = 0) -> Callable[[np.ndarray], None]:
    def check(rgb: np.ndarray) -> None:
        np.testing.assert_allclose(rgb.reshape(-1, 3), np.broadcast_to(rgb_expected, (rgb[..., 0].size, 3)), atol=atol)

    return check


def _palette_with_transparency() -> bytes:
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 255, 255, 0, 0])
    p.putpixel((0, 0), 0)
    return encode(p, transparency=1)  # index 1 (red) is transparent: everything but (0, 0) must come out white


def _palette_check(rgb: np.ndarray) -> None:
    assert tuple(rgb[0, 0]) == (0, 0, 255)
    assert (rgb.reshape(-1, 3)[1:] == 255).all()


@dataclass(frozen=True)
class Case:
    """One file: how to make its bytes, and either a refusal regex or a check of the decoded RGB array."""

    id: str
    make: Callable[[], bytes]
    expect: str | Callable[[np.ndarray], None]


def tiff(arr: np.ndarray) -> bytes:
    """A one-channel TIFF of ``arr`` (int32 -> mode I, float32 -> mode F)."""
    return encode(Image.fromarray(arr), "TIFF")


def full(value: float, dtype: type) -> np.ndarray:
    """A 4x4 array of ``value``."""
    return np.full((4, 4), value, dtype)


CASES = [
    # 16-bit and other wide grayscale: full-range /257 (documented in quantvggt.images), never clipped to white
    Case("png-16bit-gray-ramp", lambda: encode(Image.fromarray(RAMP16)), _gray_is(np.round(RAMP16 / 257))),
    Case("png-16bit-12bit-data", lambda: encode(Image.fromarray(RAMP16 // 16)), _gray_is(np.round(RAMP16 // 16 / 257))),
    Case("tiff-int32-16bit-range", lambda: tiff(RAMP16.astype(np.int32)), _gray_is(np.round(RAMP16 / 257))),
    Case("tiff-int32-negative", lambda: tiff(full(-5, np.int32)), "outside 0..65535"),
    Case("tiff-float-0-1", lambda: tiff(full(0.5, np.float32)), _gray_is(full(128, np.uint8))),
    Case("tiff-float-depth-like", lambda: tiff(full(3.5, np.float32)), r"float samples outside \[0, 1\]"),
    Case("tiff-float-nan", lambda: tiff(full(np.nan, np.float32)), r"float samples outside \[0, 1\]"),
    # sizes refused from the header, before decoding
    Case("png-header-30000x30000", lambda: png(30000, 30000), "header claims too many pixels"),
    Case("png-over-pixel-limit", lambda: png(10000, 8500), r"85\.0 Mpx, over the 80 Mpx limit"),
    Case("png-1x12000-sliver", lambda: png(1, 12000, raw=b"\x00\x80" * 12000), "aspect ratio 12000:1 is over the 20:1"),
    # colour models: converted correctly or refused
    Case(
        "tiff-cmyk-cyan", lambda: encode(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "TIFF"), _colour_is((0, 255, 255))
    ),
    Case(
        "jpeg-cmyk-adobe-inverted",  # Pillow undoes Adobe's inverted CMYK JPEG storage
        lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG", quality=95),
        _colour_is((255, 0, 255), atol=3),
    ),
    Case("png-palette-with-transparency", _palette_with_transparency, _palette_check),
    Case("png-gray-colour-key", lambda: encode(Image.new("L", (4, 4), 7), transparency=7), _colour_is((255, 255, 255))),
    Case("png-la-fully-transparent", lambda: encode(Image.new("LA", (4, 4), (0, 0))), _colour_is((255, 255, 255))),
    Case("tiff-lab", lambda: encode(Image.new("LAB", (4, 4), (50, 10, 10)), "TIFF"), "pixel mode LAB is not supported"),
    # damaged files
    Case("png-truncated", lambda: encode(Image.fromarray(RAMP16))[:60], "corrupt or truncated"),
    Case("not-an-image", lambda: b"GIF89a? no, just text", "not a recognised image format"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case) -> None:
    data = case.make()
    if isinstance(case.expect, str):
        with pytest.raises(ImageLoadError, match=f"^{case.id}: .*{case.expect}"):
            open_image(data, name=case.id)
    else:
        case.expect(np.asarray(open_image(data, name=case.id)))


def test_scan_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for c in CASES:
        ext = {"jpeg": "jpg", "tiff": "tif"}.get(c.id.split("-")[0], "png")
        (tmp_path / f"{c.id}.{ext}").write_bytes(c.make())
    (tmp_path / "zz-decoder-bug.png").write_bytes(encode(Image.new("RGB", (4, 4))))
    real_open = images.open_image

    def flaky(src: object, name: str = "") -> Image.Image:
        if name == "zz-decoder-bug.png":
            raise RuntimeError("decoder bug not mapped to ImageLoadError")
        return real_open(src, name=name)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "open_image", flaky)
    good, skipped = readable_images(tmp_path)
    refused = {c.id for c in CASES if isinstance(c.expect, str)} | {"zz-decoder-bug"}
    assert {Path(s["name"]).stem for s in skipped} == refused
    assert {p.stem for p in good} == {c.id for c in CASES} - refused
    assert all(s["reason"].startswith(s["name"] + ": ") for s in skipped)  # each reason names its file


@pytest.mark.parametrize("size", [(1, 12000), (10000, 8500)])
def test_size_refused_before_any_pixel_is_decoded(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageLoadError, match="over the"):
        open_image(png(*size), name="big.png")


def test_16bit_png_reaches_the_model_unsaturated(tmp_path: Path) -> None:
    Image.fromarray(RAMP16).save(tmp_path / "depth16.png")
    batch = load_and_preprocess([tmp_path / "depth16.png"], target_size=28)
    assert float(batch.images.min()) < 0.1 and float(batch.images.max()) > 0.9  # a ramp, not all white


# -- blank frames and the reference frame ---------------------------------------------------------------------
def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8))


BLANKS = {
    "white": Image.new("RGB", (32, 24), (255, 255, 255)),
    "transparent": Image.new("RGBA", (32, 24), (10, 200, 30, 0)),
    "black": Image.new("RGB", (32, 24)),
    "near-flat": Image.fromarray(np.random.default_rng(0).integers(250, 253, (24, 32, 3), dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", BLANKS)
def test_blank_frames_are_recognised(kind: str) -> None:
    assert frame_is_blank(open_image(encode(BLANKS[kind])))
    assert not frame_is_blank(open_image(encode(_noise(0))))


@pytest.mark.parametrize("kind", ["white", "transparent"])
def test_blank_first_frame_is_not_the_reference(kind: str, tmp_path: Path) -> None:
    BLANKS[kind].save(tmp_path / "a.png")
    for i in range(3):
        _noise(i).save(tmp_path / f"b{i}.png")
    good, skipped = readable_images(tmp_path)
    assert [p.name for p in good] == ["a.png", "b0.png", "b1.png", "b2.png"] and not skipped  # still used
    assert [p.name for p in reference_first(good)] == ["b0.png", "a.png", "b1.png", "b2.png"]


def test_all_blank_frames_is_a_clear_error(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        BLANKS["white"].save(tmp_path / name)
    with pytest.raises(ImageLoadError, match="none of the 2 frames can be the reference"):
        reference_first(sorted(tmp_path.iterdir()))


def test_scene_scan_puts_a_non_blank_frame_first(tmp_path: Path) -> None:
    from quantvggt.reconstruct import scan_scene

    BLANKS["white"].save(tmp_path / "a.png")
    for i in range(3):
        _noise(i).save(tmp_path / f"b{i}.png")
    paths, _ = scan_scene(tmp_path)
    assert not frame_is_blank(open_image(paths[0]))

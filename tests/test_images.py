"""Image loading / preprocessing and the model->original pixel map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantvggt.images import ImageLoadError, list_images, load_and_preprocess, open_image, preprocess_image


def _save(path: Path, w: int, h: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def test_crop_mode_shapes_and_transform(tmp_path: Path) -> None:
    img = open_image(_save(tmp_path / "a.png", 640, 480))
    t, tf = preprocess_image(img, "crop")
    assert t.shape == (3, 392, 518)  # 480*518/640 = 388.5 -> 392 (multiple of 14)
    # image corners map back to the original corners
    np.testing.assert_allclose(tf.to_original(np.array([[0.0, 0.0], [518.0, 392.0]])), [[0, 0], [640, 480]], atol=1e-9)


def test_crop_mode_portrait_is_center_cropped(tmp_path: Path) -> None:
    img = open_image(_save(tmp_path / "p.png", 300, 600))
    t, tf = preprocess_image(img, "crop")
    assert t.shape == (3, 518, 518)
    # model row 0 is 259 resized rows (of 1036) below the top: 150 original rows
    np.testing.assert_allclose(tf.to_original(np.array([0.0, 0.0])), [0.0, 150.0], atol=1e-9)


def test_pad_mode_is_square_with_white(tmp_path: Path) -> None:
    img = open_image(_save(tmp_path / "p.png", 300, 600))
    t, tf = preprocess_image(img, "pad")
    assert t.shape == (3, 518, 518)
    assert float(t[:, :, 0].min()) == 1.0  # padded columns are white
    np.testing.assert_allclose(tf.to_original(np.array([tf.ox, tf.oy])), [0.0, 0.0], atol=1e-9)


def test_intrinsics_to_original(tmp_path: Path) -> None:
    img = open_image(_save(tmp_path / "a.png", 640, 480))
    _, tf = preprocess_image(img, "crop")
    K = np.array([[500.0, 0, 259.0], [0, 500.0, 196.0], [0, 0, 1]])
    Ko = tf.intrinsics_to_original(K)
    # projecting a camera ray through K then back equals projecting through Ko in original pixels
    ray = np.array([0.1, -0.2, 1.0])
    uv = (K @ ray)[:2]
    np.testing.assert_allclose(tf.to_original(uv), (Ko @ ray)[:2], atol=1e-9)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((20, 20, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(open_image(tmp_path / "t.png")).min() == 255


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not an image at all", "not a recognised image")])
def test_bad_files_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match=f"bad.jpg.*{match}"):
        open_image(p)


def test_truncated_image(tmp_path: Path) -> None:
    p = _save(tmp_path / "t.png", 64, 64)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="t.png: corrupt"):
        open_image(p)


def test_mixed_sizes_are_padded_and_transforms_shifted(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.png", 640, 480)
    b = _save(tmp_path / "b.png", 640, 360)
    batch = load_and_preprocess([a, b])
    assert batch.images.shape == (2, 3, 392, 518)
    assert batch.original_sizes == [(640, 480), (640, 360)]
    tf = batch.transforms[1]
    assert tf.oy > 0
    np.testing.assert_allclose(tf.to_original(np.array([0.0, tf.oy])), [0.0, 0.0], atol=1e-9)


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    for n in ("b.JPG", "a.png", "c.txt", "d.WebP", "e.tif"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "d.WebP", "e.tif"]

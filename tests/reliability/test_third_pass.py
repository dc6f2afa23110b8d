"""Third reliability pass (issue #26): outputs compared by inode, outputs of `quantize` / `select-calibration`,
database.db on a full disk and in bounded memory, truncated JPEGs, EXIF orientation, skipped files, unsafe names,
NaN weights, and argument / config validation.

How to add a case: most sections are a table (``OVERLAPS``, ``REFUSED_FOLDERS``, ``BAD_CONFIGS``, ...); add a row.
A case must fail on the code before its fix (each row names the symptom it had) and run in about a second.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantvggt import synth
from quantvggt.colmap import ColmapModel
from quantvggt.fsutil import check_output_file, check_output_folder, check_outputs_outside_inputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic scenes of 3 frames (56x42) to copy from."""
    return synth.main(tmp_path_factory.mktemp("src"), scenes=2, frames=3, seed=0, size=(56, 42))


@pytest.fixture
def data(tmp_path: Path, scenes: Path) -> Path:
    """``tmp/data/scene_000``, ``tmp/data/scene_001``: copies a test may damage."""
    for s in ("scene_000", "scene_001"):
        shutil.copytree(scenes / s, tmp_path / "data" / s)
    return tmp_path / "data"


def frames(folder: Path) -> list[str]:
    """The PNG frames of a scene folder."""
    return sorted(p.name for p in folder.glob("*.png"))


# -- 1. outputs over inputs reached through another path (bind mount) -------------------------------------------------
def _can_bind_mount() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def _in_mount_namespace(tmp: Path, binds: list[tuple[Path, Path]], code: str) -> subprocess.CompletedProcess[str]:
    """Run python ``code`` in a private mount namespace where each (source, target) folder is bind-mounted."""
    mounts = " && ".join(f"mount --bind '{s}' '{t}'" for s, t in binds)
    script = tmp / "check.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"{mounts} && exec '{sys.executable}' '{script}'"],
        capture_output=True,
        text=True,
        cwd=tmp,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


OVERLAPS = [
    # (id, output relative to the bind target "mnt" (a second path to data/), input, expected wording)
    ("out-root-is-the-scenes-parent", "scene_000", "data/scene_000", "is the input folder"),
    ("out-inside-the-scene", "scene_000/out", "data/scene_000", "lies inside the input folder"),
    ("out-contains-the-scene", ".", "data/scene_000", "contains the input folder"),
]


@pytest.mark.skipif(not _can_bind_mount(), reason="needs unshare -rm (user + mount namespaces) for a bind mount")
@pytest.mark.parametrize(("out", "inp", "how"), [c[1:] for c in OVERLAPS], ids=[c[0] for c in OVERLAPS])
def test_overlap_through_a_bind_mount_is_found(out: str, inp: str, how: str, data: Path) -> None:
    # `reconstruct data/scene_000 --out mnt` with mnt a bind mount of data/ compared path strings and deleted frames
    tmp = data.parent
    (tmp / "mnt").mkdir()
    r = _in_mount_namespace(
        tmp,
        [(data, tmp / "mnt")],
        f"""
        import os
        from quantvggt.fsutil import check_outputs_outside_inputs
        assert os.path.samefile("mnt", "data")  # the mount is in place: two paths, one folder
        try:
            check_outputs_outside_inputs([os.path.normpath("mnt/{out}")], ["{inp}"])
        except ValueError as e:
            print("REFUSED", e)
        else:
            print("ACCEPTED")
        """,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("REFUSED") and how in r.stdout, r.stdout


@pytest.mark.skipif(not _can_bind_mount(), reason="needs unshare -rm (user + mount namespaces) for a bind mount")
def test_reconstruct_into_a_bind_mount_of_the_scenes_parent_keeps_the_frames(data: Path) -> None:
    tmp = data.parent
    (tmp / "mnt").mkdir()
    r = _in_mount_namespace(
        tmp,
        [(data, tmp / "mnt")],
        """
        import sys
        from quantvggt import cli
        cli.plugin_commands = lambda taken=(): []
        sys.exit(cli.main(["reconstruct", "data/scene_000", "--out", "mnt", "--model", "vggt-tiny-synthetic"]))
        """,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    refused = r"quantvggt reconstruct: error: output \S*mnt/scene_000 is the input folder \S*data/scene_000"
    assert re.search(refused, r.stderr)
    assert frames(data / "scene_000") == ["frame_000.png", "frame_001.png", "frame_002.png"]


def test_different_folders_with_one_name_are_not_an_overlap(tmp_path: Path) -> None:
    for p in ("a/scene", "b/scene"):
        (tmp_path / p).mkdir(parents=True)
    check_outputs_outside_inputs([tmp_path / "a" / "scene"], [tmp_path / "b" / "scene"])
    check_outputs_outside_inputs([tmp_path / "a" / "new" / "x"], [tmp_path / "b"])  # missing outputs are fine
    check_outputs_outside_inputs([tmp_path / "a"], [tmp_path / "b" / "missing"])


# -- 2. `quantize --out` and `select-calibration --out`: never over someone's data or an input ----------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_output_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_1.jpg").write_bytes(b"a photo")
    with pytest.raises(ValueError, match=r"photos: is a folder that is not empty and has no quant.json"):
        check_output_folder(photos, own_marker="quant.json")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", own_marker="quant.json")  # new, empty or ours: fine
    check_output_folder(tmp_path / "new" / "ckpt", own_marker="quant.json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "quant.json").write_text("{}")
    check_output_folder(tmp_path / "old", own_marker="quant.json")
    (tmp_path / "old" / "scene").mkdir()
    with pytest.raises(ValueError, match="contains the input folder"):
        check_output_folder(tmp_path / "old", [tmp_path / "old" / "scene"], own_marker="quant.json")
    with pytest.raises(ValueError, match="lies inside the input folder"):
        check_output_folder(photos / "ckpt", [photos], own_marker="quant.json")
    with pytest.raises(ValueError, match="exists and is not one of our results"):
        check_output_file(photos / "IMG_1.jpg")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        check_output_file(photos)


def test_save_quantized_never_replaces_data_or_writes_into_an_input(tmp_path: Path, data: Path) -> None:
    from quantvggt.quant import get_recipe, quantize_, save_quantized
    from tests.conftest import sane_tiny_model

    model = sane_tiny_model()
    quantize_(model, get_recipe("rtn-w4a4"))
    before = _tree(data)
    with pytest.raises(ValueError, match=r"data: is a folder that is not empty and has no quant.json"):
        save_quantized(model, data)
    with pytest.raises(ValueError, match="lies inside the input folder"):
        save_quantized(model, data / "scene_000" / "ckpt", inputs=[data / "scene_000"])
    assert _tree(data) == before
    ckpt = save_quantized(model, tmp_path / "ckpt")
    assert save_quantized(model, ckpt) == ckpt  # our own checkpoint is replaced as before


QUANTIZE_OUTS = [
    # `quantize --out data` replaced the calibration scene's parent folder; `--out photos` deleted the photos
    ("out-is-the-calibration-scenes-parent", lambda d: d, "contains the input folder .*scene_000"),
    ("out-is-a-photo-folder", lambda d: d.parent / "photos", "is a folder that is not empty and has no quant.json"),
]


@pytest.mark.parametrize(("out", "expect"), [c[1:] for c in QUANTIZE_OUTS], ids=[c[0] for c in QUANTIZE_OUTS])
def test_quantize_out_never_replaces_data(out: Callable, expect: str, data: Path, run_cli: Callable) -> None:
    (data.parent / "photos").mkdir()
    (data.parent / "photos" / "IMG_1.jpg").write_bytes(b"a photo")
    before = _tree(data.parent)
    argv = ["quantize", "--model", "vggt-tiny-synthetic", "--calibration", data / "scene_000", "--recipe", "rtn-w4a4"]
    rc, stdout, err = run_cli(*argv, "--frames", "2", "--out", out(data))
    assert rc == 2 and re.search(expect, err) and len(err.strip().splitlines()) == 1, stdout + err
    assert _tree(data.parent) == before


SELECTION_OUTS = [
    # the plot landed inside the scene and became a frame of it
    ("inside-a-scene", lambda d: d / "scene_000" / "sel.parquet", "lies inside the input folder"),
    # the plot replaced frame_000.png
    ("plot-over-a-frame", lambda d: d / "scene_000" / "frame_000.parquet", "lies inside the input folder"),
    # the plot beside a manifest in the pool folder made the pool folder a scene of its own on the next run
    ("in-the-pool-folder", lambda d: d / "sel.parquet", "lies inside the input folder"),
    ("onto-a-photo", lambda d: d.parent / "photos" / "IMG_1.jpg", "must end in .parquet"),
    ("plot-onto-a-photo", lambda d: d.parent / "photos" / "IMG_1.parquet", "IMG_1.png: exists and is not one of our"),
]


@pytest.mark.parametrize(("out", "expect"), [c[1:] for c in SELECTION_OUTS], ids=[c[0] for c in SELECTION_OUTS])
def test_select_calibration_out_never_lands_in_an_input(
    out: Callable, expect: str, data: Path, run_cli: Callable
) -> None:
    (data.parent / "photos").mkdir()
    for name in ("IMG_1.jpg", "IMG_1.png"):
        (data.parent / "photos" / name).write_bytes(b"a photo")
    before = _tree(data.parent)
    argv = ["select-calibration", data, "--model", "vggt-tiny-synthetic", "--frames", "2", "--clusters", "1"]
    rc, stdout, err = run_cli(*argv, "--out", out(data))
    assert rc == 2 and re.search(expect, err) and len(err.strip().splitlines()) == 1, stdout + err
    assert _tree(data.parent) == before


def test_select_calibration_replaces_its_own_manifest_and_plot(data: Path, tmp_path: Path, run_cli: Callable) -> None:
    argv = ["select-calibration", data, "--model", "vggt-tiny-synthetic", "--frames", "2", "--clusters", "1"]
    for _ in range(2):  # the second run replaces what the first wrote
        rc, stdout, err = run_cli(*argv, "--out", tmp_path / "sel" / "m.parquet")
        assert rc == 0, stdout + err
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["m.parquet", "m.png"]


COUNTS = [
    # --clusters 0 selected nothing and exited 0
    ("clusters-0", ["--clusters", "0"], "n_clusters must be a whole number >= 1, got 0"),
    ("per-cluster-0", ["--per-cluster", "0"], "per_cluster must be a whole number >= 1, got 0"),
    ("frames-1", ["--frames", "1"], "frames must be a whole number >= 2, got 1"),
]


@pytest.mark.parametrize(("opts", "expect"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS])
def test_select_calibration_refuses_bad_counts(opts: list[str], expect: str, data: Path, run_cli: Callable) -> None:
    argv = ["select-calibration", data, "--model", "vggt-tiny-synthetic", "--out", data.parent / "m.parquet"]
    rc, stdout, err = run_cli(*argv, *opts)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, stdout + err
    assert not (data.parent / "m.parquet").exists()


# -- 3. database.db: a full disk fails one scene in one line; matches built in bounded memory -------------------------
def _model(S: int, N: int, seen: float, seed: int = 0) -> ColmapModel:
    """A ColmapModel of S images and N points, each point observed by a random ``seen`` share of the images (>= 2)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((N, S)) < seen
    mask[np.arange(N), rng.integers(0, S, N)] = True
    mask[np.arange(N), (rng.integers(1, S, N) + np.argmax(mask, 1)) % S] = True
    obs_point, obs_image = np.nonzero(mask)
    cam = np.zeros((S, 3, 4))
    cam[:, :, :3] = np.eye(3)
    cam[:, 0, 3] = np.arange(S)
    return ColmapModel(
        camera_sizes=np.array([[64, 48]]),
        camera_params=np.array([[50.0, 50.0, 32.0, 24.0]]),
        image_names=[f"f{i:04d}.png" for i in range(S)],
        image_camera=np.zeros(S, np.int64),
        cam_from_world=cam,
        xyz=rng.random((N, 3)) + np.array([0.0, 0.0, 5.0]),
        rgb=np.zeros((N, 3), np.uint8),
        obs_point=obs_point.astype(np.int64),
        obs_image=obs_image.astype(np.int64),
        obs_xy=rng.random((obs_point.size, 2)) * 40,
    )


def _matches(db: Path) -> dict[tuple[int, int], set[tuple[int, int]]]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT pair_id, data FROM two_view_geometries").fetchall()
    out = {}
    for pair_id, blob in rows:
        m = np.frombuffer(blob, "<u4").reshape(-1, 2)
        out[(pair_id // 2147483647 - 1, pair_id % 2147483647 - 1)] = {tuple(r) for r in m.tolist()}
    return out


def _expected_matches(m: ColmapModel) -> dict[tuple[int, int], set[tuple[int, int]]]:
    """Every two observations of a track, from the points2D order images.bin is written in (by image, then point)."""
    _, p2d = m._point2d_index()
    out: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for p in range(m.num_points):
        obs = sorted(np.flatnonzero(m.obs_point == p), key=lambda o: m.obs_image[o])
        for x, y in itertools.combinations(obs, 2):
            out.setdefault((int(m.obs_image[x]), int(m.obs_image[y])), set()).add((int(p2d[x]), int(p2d[y])))
    return out


@pytest.mark.parametrize("budget_mb", [None, 0.01], ids=["default-budget", "tiny-budget-many-groups"])
def test_database_holds_every_match_of_every_track(budget_mb: float | None, tmp_path: Path) -> None:
    m = _model(S=12, N=300, seen=0.4)
    stats: dict = {}
    m.write_database(tmp_path / "database.db", budget_mb, stats)
    assert _matches(tmp_path / "database.db") == _expected_matches(m)
    lengths = m.track_lengths()
    assert stats["matches"] == int((lengths * (lengths - 1) // 2).sum())
    if budget_mb:
        assert stats["peak_matches_in_memory"] < stats["matches"] / 10  # streamed in many small groups


def test_database_is_built_within_the_memory_budget(tmp_path: Path) -> None:
    # a 600-frame scene peaked at 8.5 GB (every pair of every track at once) and MemoryError killed the batch; here
    # 60 frames x 3000 points seen by all: 5.3 M matches, ~400 MB the old way; the budget is 16 MB
    m = _model(S=60, N=3000, seen=1.0)
    m._point2d_index()
    tracemalloc.start()
    try:
        stats: dict = {}
        m.write_database(tmp_path / "database.db", 16, stats)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats["matches"] == 3000 * 60 * 59 // 2
    fixed = 3 * m.obs_point.size * 8  # the per-observation index arrays every way of writing needs
    assert peak < 16 * 2**20 * 1.25 + fixed, f"peak {peak / 2**20:.1f} MB"


def test_reconstruct_passes_its_memory_budget_to_the_database(data: Path, tmp_path: Path) -> None:
    from quantvggt.quant.load import load_model
    from quantvggt.reconstruct import ReconstructionOptions, main

    res = main(load_model("vggt-tiny-synthetic", "cpu"), data / "scene_000", tmp_path / "out",
               ReconstructionOptions(max_points=200, memory_budget_mb=64))  # fmt: skip
    report = json.loads(Path(res.report).read_text())
    assert report["workspace"]["database_pairs"]["budget_mb"] == 64
    assert report["workspace"]["database_pairs"]["pairs"] >= 1


def _full_disk_for(scene: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite writing ``<scene>``'s database.db hits a full disk (a real SQLITE_FULL: max_page_count reached)."""
    real = sqlite3.connect

    def connect(path: str | Path, *a: object, **k: object) -> sqlite3.Connection:
        con = real(path, *a, **k)  # type: ignore[arg-type]
        if f".{scene}." in str(path):
            con.execute("PRAGMA max_page_count = 8")
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_a_full_disk_writing_the_database_fails_one_scene_and_the_batch_goes_on(
    data: Path, run_cli: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sqlite3.OperationalError is not an OSError: it escaped the per-scene handler and ended the batch
    _full_disk_for("scene_000", monkeypatch)
    out = data.parent / "out"
    rc, stdout, err = run_cli(
        "reconstruct", data / "scene_000", data / "scene_001", "--out", out, "--model", "vggt-tiny-synthetic"
    )
    assert rc == 1 and "Traceback" not in stdout + err, stdout + err
    failed = [line for line in stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1, stdout
    assert re.fullmatch(
        r"scene_000: FAILED: .*out/scene_000: cannot write the result \(No space left on device, writing database.db\)",
        failed[0],
    ), failed[0]
    assert "1 of 2 scenes reconstructed" in stdout
    assert (out / "scene_001" / "database.db").is_file() and not (out / "scene_000").exists()
    assert sorted(p.name for p in out.iterdir()) == ["scene_001"]  # no temporary folder left behind


def test_other_sqlite_errors_are_one_line_naming_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model(S=3, N=20, seen=1.0)

    def broken(*a: object, **k: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", broken)
    with pytest.raises(OSError, match=r"^database.db: cannot write the COLMAP database \(sqlite3: OperationalError"):
        m.write_database(tmp_path / "database.db")


# -- 4. frames: truncated JPEGs, formats that were ignored, broken links -----------------------------------------------
def _photo(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _zero_second_half(data: bytes) -> bytes:
    return data[: len(data) // 2] + bytes(len(data) - len(data) // 2)


def _zeros_after(data: bytes, share: float) -> bytes:
    k = int(len(data) * share)
    return data[:k] + bytes(len(data) - k)


TRUNCATED = [
    # (id, file bytes): each decoded without a word before (Pillow reads zeros as valid entropy-coded data)
    ("jpeg-second-half-zeros", _zero_second_half(_encode(_photo(), "JPEG", quality=90))),
    ("jpeg-last-tenth-zeros", _zeros_after(_encode(_photo(), "JPEG", quality=95), 0.9)),
    ("jpeg-444-last-quarter-zeros", _zeros_after(_encode(_photo(), "JPEG", subsampling=0), 0.75)),
]


@pytest.mark.parametrize("data", [c[1] for c in TRUNCATED], ids=[c[0] for c in TRUNCATED])
def test_truncated_jpegs_are_refused(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    from quantvggt.images import ImageLoadError, open_image

    expect = r"^cut.jpg: corrupt or truncated image \(JPEG data ends without its end marker\)$"
    with pytest.raises(ImageLoadError, match=expect):
        open_image(data, name="cut.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # another library turned Pillow's flag on
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        open_image(_encode(_photo(), "PNG")[:-40], name="cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and it is left as it was
    padded = _encode(_photo(), "JPEG") + bytes(64)  # padding after the end marker, as some cameras write
    assert open_image(padded, name="padded.jpg").size == (64, 48)


def _animated_gif() -> bytes:
    buf = io.BytesIO()
    _photo(0).save(buf, "GIF", save_all=True, append_images=[_photo(1)])
    return buf.getvalue()


def test_every_frame_format_is_used_or_skipped_with_a_reason(data: Path, tmp_path: Path) -> None:
    # .bmp/.gif/.jfif/.heic frames and broken links were ignored without a message (not used, not in report.json)
    from quantvggt.quant.load import load_model
    from quantvggt.reconstruct import ReconstructionOptions, main

    scene = data / "scene_000"
    src = Image.open(scene / "frame_001.png").convert("RGB")
    (scene / "frame_003.bmp").write_bytes(_encode(src, "BMP"))
    (scene / "frame_004.gif").write_bytes(_encode(src, "GIF"))
    (scene / "frame_005.jfif").write_bytes(_encode(src, "JPEG", quality=95))
    (scene / "frame_006.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(100))
    (scene / "frame_007.gif").write_bytes(_animated_gif())
    (scene / "frame_008.jpg").symlink_to(tmp_path / "gone.jpg")
    (scene / "notes.txt").write_text("not a frame, not listed")
    res = main(load_model("vggt-tiny-synthetic", "cpu"), scene, tmp_path / "out", ReconstructionOptions(max_points=50))
    report = json.loads(Path(res.report).read_text())
    expected_used = ["frame_000.png", "frame_001.png", "frame_002.png", "frame_003.bmp", "frame_004.gif"]
    assert sorted(report["images_used"]) == [*expected_used, "frame_005.jfif"]
    skipped = {s["name"]: s["reason"] for s in report["images_skipped"]}
    assert set(skipped) == {"frame_006.heic", "frame_007.gif", "frame_008.jpg"}
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        assert "HEIC/HEIF image: decoding it needs the pillow-heif package" in skipped["frame_006.heic"]
    assert "animated GIF with 2 pictures" in skipped["frame_007.gif"]
    assert re.search(r"broken symbolic link \(its target .*gone.jpg is missing\)", skipped["frame_008.jpg"])


# -- 5. the exported workspace: EXIF-rotated frames, names COLMAP cannot hold, NaN weights ----------------------------
def test_an_exif_rotated_frame_is_written_upright_in_images(data: Path, tmp_path: Path) -> None:
    # the camera was the upright one (the model sees frames upright) but images/ linked the stored, rotated pixels
    import pycolmap

    from quantvggt.images import open_image
    from quantvggt.quant.load import load_model
    from quantvggt.reconstruct import ReconstructionOptions, main

    scene = data / "scene_000"
    upright = Image.open(scene / "frame_001.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright picture turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(scene / "frame_001.jpg", quality=95, exif=exif.tobytes())
    (scene / "frame_001.png").unlink()
    for images in ("link", "copy"):
        res = main(load_model("vggt-tiny-synthetic", "cpu"), scene, tmp_path / images,
                   ReconstructionOptions(max_points=50, images=images))  # fmt: skip
        ws = Path(res.output)
        rec = pycolmap.Reconstruction(str(ws / "sparse" / "0"))
        image = next(im for im in rec.images.values() if im.name == "frame_001.jpg")
        camera = rec.cameras[image.camera_id]
        stored = ws / "images" / "frame_001.jpg"
        with Image.open(stored) as im:  # read as COLMAP and splatting trainers do: the stored pixels, no tag
            assert im.size == (camera.width, camera.height) == upright.size
            assert im.getexif().get(0x0112, 1) == 1
            got = np.asarray(im.convert("RGB"), np.int16)
        seen = open_image(scene / "frame_001.jpg")  # what the model saw
        right = float(np.abs(got - np.asarray(seen, np.int16)).mean())
        turned = float(np.abs(got - np.asarray(seen.rotate(180), np.int16)).mean())
        assert right < 4 and right < turned / 4  # the upright picture (re-encoded once), not a turned one
        assert not stored.is_symlink()
        assert (ws / "images" / "frame_000.png").is_symlink() == (images == "link")  # the others as asked
        report = json.loads(Path(res.report).read_text())
        assert report["workspace"]["images_written_upright"] == ["frame_001.jpg"]


def test_names_colmap_cannot_hold_are_renamed_with_a_mapping(data: Path, tmp_path: Path) -> None:
    # `--text` models of "frame 000.png" were cut at the space by COLMAP's reader; a newline broke images.txt
    import pycolmap

    from quantvggt.quant.load import load_model
    from quantvggt.reconstruct import ReconstructionOptions, main

    scene = data / "scene_000"
    (scene / "frame_000.png").rename(scene / "frame 000.png")
    (scene / "frame_001.png").rename(scene / "frame\n001.png")
    res = main(load_model("vggt-tiny-synthetic", "cpu"), scene, tmp_path / "out",
               ReconstructionOptions(max_points=50, text=True))  # fmt: skip
    ws = Path(res.output)
    expected = {"frame_000.png", "frame_001.png", "frame_002.png"}
    lines = (ws / "sparse" / "0" / "images.txt").read_text().splitlines()
    assert {line.split()[-1] for line in lines if line.endswith(".png")} == expected
    text = pycolmap.Reconstruction()
    text.read_text(str(ws / "sparse" / "0"))
    assert {im.name for im in text.images.values()} == expected
    assert {im.name for im in pycolmap.Reconstruction(str(ws / "sparse" / "0")).images.values()} == expected
    assert {p.name for p in (ws / "images").iterdir()} == expected
    assert (ws / "images" / "frame_001.png").resolve() == (scene / "frame\n001.png").resolve()
    report = json.loads(Path(res.report).read_text())
    assert report["renamed_images"] == {"frame_000.png": "frame 000.png", "frame_001.png": "frame\n001.png"}


def test_colmap_image_names_never_collide() -> None:
    from quantvggt.colmap import colmap_image_names

    names, renamed = colmap_image_names(["a b.png", "a_b.png", "a\tb.png", "ok.jpg", "bad\udcff.png"])
    assert names == ["a_b-2.png", "a_b.png", "a_b-3.png", "ok.jpg", "bad_.png"]
    assert renamed == {"a_b-2.png": "a b.png", "a_b-3.png": "a\tb.png", "bad_.png": "bad\udcff.png"}


def test_nan_weights_fail_the_scene_instead_of_a_model_of_zero_points(
    data: Path, tmp_path: Path, run_cli: Callable
) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(REPO / "quantvggt" / "assets" / "vggt-tiny-synthetic", broken)
    weights = next(broken.glob("*.safetensors"))
    sd = load_file(str(weights))
    for k, v in sd.items():
        if k.startswith("depth_head.") and v.is_floating_point():
            v.fill_(float("nan"))
    save_file(sd, str(weights))
    rc, stdout, err = run_cli("reconstruct", data / "scene_000", "--out", tmp_path / "out", "--model", broken)
    assert rc == 1 and "Traceback" not in stdout + err, stdout + err
    assert re.search(r"^scene_000: FAILED: scene_000: the model predicted no finite depth or confidence", stdout, re.M)
    assert not (tmp_path / "out" / "scene_000").exists()


# -- 6. train options -------------------------------------------------------------------------------------------------
TRAIN = [
    # (id, options, expected one-line error): steps -1 trained nothing and said it wrote a checkpoint; the others
    # were tracebacks
    ("steps-negative", ["--steps", "-1"], "steps must be a whole number >= 1, got -1"),
    ("batch-size-0", ["--batch-size", "0"], "batch_size must be a whole number >= 1, got 0"),
    ("lr-nan", ["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
    ("workers-negative", ["--workers", "-2"], "workers must be a whole number >= 0, got -2"),
    ("device-bogus", ["--device", "gpu0"], "device 'gpu0' is not a torch device"),
]


@pytest.mark.parametrize(("opts", "expect"), [c[1:] for c in TRAIN], ids=[c[0] for c in TRAIN])
def test_bad_train_options_are_one_line(opts: list[str], expect: str, tmp_path: Path, run_cli: Callable) -> None:
    rc, stdout, err = run_cli("train", "--out", tmp_path / "run", *opts)
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, stdout + err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_train_on_cuda_without_a_gpu_is_one_line(tmp_path: Path, run_cli: Callable) -> None:
    rc, stdout, err = run_cli("train", "--out", tmp_path / "run", "--device", "cuda", "--steps", "1")
    assert rc == 2 and len(err.strip().splitlines()) == 1, stdout + err
    assert "device 'cuda': no CUDA GPU is available here (use --device cpu)" in err
    assert not (tmp_path / "run").exists()


def test_a_broken_saved_train_config_names_its_file(tmp_path: Path) -> None:
    from quantvggt.train.loop import main

    (tmp_path / "train_config.json").write_text(json.dumps({"steps": 10, "batch_size": 0}))
    with pytest.raises(ValueError, match=r"train_config.json: batch_size must be a whole number >= 1, got 0"):
        main(tmp_path)


# -- 7. config.json / quant.json values --------------------------------------------------------------------------------
BAD_CONFIGS = [
    # (id, path into config.json, value, expected key and problem): each was a traceback in the model's constructor
    ("embed-dim-zero", ("aggregator", "embed_dim"), 0, r"aggregator: embed_dim must be a whole number in 1\.\.65536"),
    ("depth-negative", ("aggregator", "depth"), -2, r"aggregator: depth must be a whole number in 1\.\.65536, got -2"),
    ("heads-a-string", ("aggregator", "num_heads"), "4", r"aggregator: num_heads must be a whole number .*got '4'"),
    ("depth-absurd", ("aggregator", "depth"), 10**9, r"aggregator: depth must be a whole number in 1\.\.65536"),
    ("features-float", ("depth_head", "features"), 8.5, r"depth_head: features must be a whole number .*got 8\.5"),
    ("mlp-ratio-zero", ("aggregator", "mlp_ratio"), 0, r"aggregator: mlp_ratio must be a number in 0\.001\.\.64"),
    ("qkv-bias-a-string", ("aggregator", "qkv_bias"), "yes", r"aggregator: qkv_bias must be true or false"),
    ("image-size-absurd", ("image_size",), 14 * 10**6, r"image_size must be a positive multiple of 14 up to 65536"),
    ("part-not-an-object", ("camera_head",), 3, r"camera_head must be an object of options or null, got 3"),
]  # fmt: skip


def _tiny_folder(tmp_path: Path, key: tuple[str, ...], value: object) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(REPO / "quantvggt" / "assets" / "vggt-tiny-synthetic", folder)
    cfg = json.loads((folder / "config.json").read_text())
    inner = cfg.get("config", cfg)
    node = inner
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(("key", "value", "expect"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_json_values_are_one_line_naming_file_and_key(
    key: tuple[str, ...], value: object, expect: str, tmp_path: Path, run_cli: Callable
) -> None:
    folder = _tiny_folder(tmp_path, key, value)
    frame = REPO / "quantvggt" / "assets" / "samples" / "frame_00.png"
    rc, stdout, err = run_cli("predict", frame, "--model", folder)
    assert rc == 2 and len(err.strip().splitlines()) == 1, stdout + err
    assert str(folder / "config.json") in err and re.search(expect, err), err


QUANT_JSON = [
    # (id, edit of quant.json, expected key and problem)
    ("model-config-depth-zero", lambda d: d["model_config"]["aggregator"].update(depth=0), r"depth must be a whole"),
    ("epochs-a-string", lambda d: d["config"].update(epochs="many"), r"epochs must be a whole number .*got 'many'"),
    ("alpha-negative", lambda d: d["config"].update(alpha=-1), r"alpha must be a number in 0\.\.1e\+06, got -1"),
    ("learn-smooth-a-number", lambda d: d["config"].update(learn_smooth=2), r"learn_smooth must be true or false"),
    ("scope-a-string", lambda d: d["config"].update(scope="aggregator"), r"scope must be a list of parts"),
]


@pytest.mark.parametrize(("edit", "expect"), [c[1:] for c in QUANT_JSON], ids=[c[0] for c in QUANT_JSON])
def test_bad_quant_json_values_are_one_line_naming_file_and_key(edit: Callable, expect: str, tmp_path: Path) -> None:
    from quantvggt.model.loading import CheckpointError
    from quantvggt.quant import get_recipe, load_quantized, quantize_, save_quantized
    from tests.conftest import sane_tiny_model

    model = sane_tiny_model()
    quantize_(model, get_recipe("quantvggt-w4a8", epochs=0), [torch.rand(2, 3, 28, 28)])
    ckpt = save_quantized(model, tmp_path / "ckpt")
    doc = json.loads((ckpt / "quant.json").read_text())
    edit(doc)
    (ckpt / "quant.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as err:
        load_quantized(ckpt)
    assert "\n" not in str(err.value) and str(ckpt / "quant.json") in str(err.value), err.value
    assert re.search(expect, str(err.value)), err.value

"""Check a written COLMAP sparse model before it is published: every file complete, the counts as expected.

A full disk does not always raise: a C++ writer (pycolmap's ``Reconstruction.write``) can return normally after
writing a truncated ``points3D.bin``, and reading such a file back with pycolmap is no check either (it reads a file
one byte short without complaint, and a shorter one can end in ``std::bad_alloc``). So each binary file is walked
record by record, without decoding the payload, and its size must be exactly where the last record ends. Text
files and ``points3D.ply`` are checked when present. Pure stdlib; a model of 100k points takes well under a second.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

log = logging.getLogger(__name__)

# parameters per COLMAP camera model id (colmap/sensor/models.h; the same as pycolmap 3.12-4.x)
CAMERA_MODEL_PARAMS = {
    0: 3,  # SIMPLE_PINHOLE
    1: 4,  # PINHOLE
    2: 4,  # SIMPLE_RADIAL
    3: 5,  # RADIAL
    4: 8,  # OPENCV
    5: 8,  # OPENCV_FISHEYE
    6: 12,  # FULL_OPENCV
    7: 5,  # FOV
    8: 4,  # SIMPLE_RADIAL_FISHEYE
    9: 5,  # RADIAL_FISHEYE
    10: 12,  # THIN_PRISM_FISHEYE
    11: 16,  # RAD_TAN_THIN_PRISM_FISHEYE
    12: 4,  # SIMPLE_DIVISION
    13: 5,  # DIVISION
    14: 3,  # SIMPLE_FISHEYE
    15: 4,  # FISHEYE
    16: 6,  # EUCM
    17: 2,  # EQUIRECTANGULAR
}
_POINT_HEAD = struct.Struct("<Q3d3BdQ")  # id, xyz, rgb, error, track length; then (image id, point2D idx) u32 pairs
_IMAGE_HEAD = struct.Struct("<I7dI")  # id, qw qx qy qz, tx ty tz, camera id; then the name, NUL-terminated
_CAMERA_HEAD = struct.Struct("<IiQQ")  # id, model id, width, height; then the model's float64 parameters


class ModelWriteError(OSError):
    """A written model is incomplete or not what was written (a full disk, a writer that failed silently)."""


def _fail(path: Path, problem: str) -> ModelWriteError:
    return ModelWriteError(f"{path}: written model is incomplete: {problem} (disk full or the writer failed?)")


class _Reader:
    """Bounds-checked reading of one binary file; running past its end raises ``ModelWriteError``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def take(self, st: struct.Struct, what: str) -> tuple:
        if self.pos + st.size > len(self.data):
            raise _fail(self.path, f"file ends inside {what} ({len(self.data)} bytes)")
        out = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return out

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > len(self.data):
            raise _fail(self.path, f"file ends inside {what} ({len(self.data)} bytes)")
        self.pos += n

    def name(self, what: str) -> None:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise _fail(self.path, f"file ends inside {what} ({len(self.data)} bytes)")
        self.pos = end + 1

    def count(self, what: str) -> int:
        return int(self.take(struct.Struct("<Q"), f"the number of {what}")[0])

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _fail(self.path, f"{len(self.data) - self.pos} bytes after the last record")


def _cameras(path: Path) -> int:
    r = _Reader(path)
    n = r.count("cameras")
    for i in range(n):
        _, model, _, _ = r.take(_CAMERA_HEAD, f"camera {i + 1} of {n}")
        if model not in CAMERA_MODEL_PARAMS:
            raise _fail(path, f"camera {i + 1} of {n} has unknown model id {model}")
        r.skip(8 * CAMERA_MODEL_PARAMS[model], f"camera {i + 1} of {n}")
    r.end()
    return n


def _images(path: Path) -> int:
    r = _Reader(path)
    n = r.count("images")
    for i in range(n):
        what = f"image {i + 1} of {n}"
        r.take(_IMAGE_HEAD, what)
        r.name(what)
        r.skip(24 * r.count(f"keypoints of {what}"), what)  # x, y float64 and a point3D id uint64 each
    r.end()
    return n


def _points(path: Path) -> int:
    r = _Reader(path)
    n = r.count("points")
    for i in range(n):
        length = r.take(_POINT_HEAD, f"point {i + 1} of {n}")[-1]
        r.skip(8 * length, f"the track of point {i + 1} of {n}")
    r.end()
    return n


def _rigs(path: Path) -> int:
    r = _Reader(path)
    n = r.count("rigs")
    for i in range(n):
        what = f"rig {i + 1} of {n}"
        _, sensors = r.take(struct.Struct("<II"), what)
        if sensors:
            r.skip(8, what)  # the reference sensor: type, id
        for _ in range(max(0, sensors - 1)):
            *_, has_pose = r.take(struct.Struct("<iIB"), what)
            if has_pose:
                r.skip(56, what)  # sensor_from_rig: quaternion and translation
    r.end()
    return n


def _frames(path: Path) -> int:
    r = _Reader(path)
    n = r.count("frames")
    for i in range(n):
        what = f"frame {i + 1} of {n}"
        ids = r.take(struct.Struct("<II7dI"), what)[-1]
        r.skip(16 * ids, what)  # sensor type, sensor id, data id per data id
    r.end()
    return n


def _text_rows(path: Path) -> int:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise _fail(path, "the last line is cut off")
    return sum(1 for line in data.splitlines() if line.strip() and not line.startswith(b"#"))


def _ply_vertices(path: Path) -> int:
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if end < 0:
        raise _fail(path, "no complete PLY header")
    n, size = 0, 0
    sizes = {b"float": 4, b"double": 8, b"uchar": 1, b"char": 1, b"int": 4, b"uint": 4, b"short": 2, b"ushort": 2}
    for line in data[:end].splitlines():
        words = line.split()
        if words[:2] == [b"element", b"vertex"]:
            n = int(words[2])
        elif words[:1] == [b"property"] and len(words) == 3 and words[1] in sizes:
            size += sizes[words[1]]
    if b"binary" in data[:end] and len(data) != end + len(b"end_header\n") + n * size:
        raise _fail(path, f"{len(data)} bytes, not what {n} vertices of {size} bytes take")
    return n


def verify_model(
    folder: str | Path,
    expected_images: int,
    expected_points: int,
    expected_cameras: int | None = None,
    shown_as: str | Path | None = None,
) -> dict[str, int]:
    """Check a written sparse model file by file; raise :class:`ModelWriteError` naming the file if one is short.

    ``cameras.bin``, ``images.bin`` and ``points3D.bin`` must exist; ``rigs.bin``, ``frames.bin``, the text files
    and ``points3D.ply`` are checked when present. Each binary file is walked record by record and must end exactly
    after its last record; the image and point counts (and cameras, when given) must be the ones written. Errors
    name the files under ``shown_as`` (the folder's final place) instead of ``folder`` (e.g. a temporary one).
    Returns the counts found.
    """
    folder = Path(folder)
    try:
        return _verify(folder, expected_images, expected_points, expected_cameras)
    except ModelWriteError as e:
        if shown_as is None:
            raise
        raise ModelWriteError(str(e).replace(str(folder), str(shown_as))) from None


def _verify(folder: Path, expected_images: int, expected_points: int, expected_cameras: int | None) -> dict[str, int]:
    found: dict[str, int] = {}
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        if not (folder / name).is_file():
            raise _fail(folder / name, "file missing")
    found["cameras"] = _cameras(folder / "cameras.bin")
    found["images"] = _images(folder / "images.bin")
    found["points"] = _points(folder / "points3D.bin")
    for name, walk in (("rigs.bin", _rigs), ("frames.bin", _frames)):
        if (folder / name).is_file():
            found[name.removesuffix(".bin")] = walk(folder / name)
    want = {"images": expected_images, "points": expected_points}
    if expected_cameras is not None:
        want["cameras"] = expected_cameras
    files = {"images": "images.bin", "points": "points3D.bin", "cameras": "cameras.bin"}
    for key, n in want.items():
        if found[key] != n:
            raise _fail(folder / files[key], f"holds {found[key]} {key}, {n} were written")
    if "frames" in found and found["frames"] != found["images"]:
        raise _fail(folder / "frames.bin", f"holds {found['frames']} frames for {found['images']} images")
    # text files: one line per camera and point, two per image (the second may be empty, so count points3D/cameras)
    for name, key in (
        ("cameras.txt", "cameras"),
        ("points3D.txt", "points"),
        ("rigs.txt", "rigs"),
        ("frames.txt", "frames"),
    ):
        if not (folder / name).is_file():
            continue
        rows = _text_rows(folder / name)
        if key in found and rows != found[key]:
            raise _fail(folder / name, f"holds {rows} {key}, {found[key]} were written")
    if (folder / "images.txt").is_file():
        _text_rows(folder / "images.txt")  # complete last line; its row count depends on empty keypoint lines
    if (folder / "points3D.ply").is_file() and _ply_vertices(folder / "points3D.ply") != found["points"]:
        raise _fail(folder / "points3D.ply", f"holds a different number of points than the {found['points']} written")
    log.debug("%s verified: %s", folder, found)
    return found

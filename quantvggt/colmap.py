"""COLMAP export: multi-view tracks from a prediction, optional bundle adjustment, and a workspace COLMAP opens.

A :class:`~quantvggt.prediction.ScenePrediction` becomes a :class:`ColmapModel` of numpy arrays (cameras, posed
images, 3D points with their tracks). Tracks come from the prediction itself: every kept point is projected into the
other frames with the predicted cameras and observed where that frame's predicted depth agrees. The model is
written as COLMAP binary files straight from the arrays (no per-point Python loop) and read back by pycolmap only
where pycolmap works on it (bundle adjustment, text files, :attr:`ColmapResult.reconstruction`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import struct
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quantvggt.geometry import mat_to_quat
from quantvggt.images import ImageTransform
from quantvggt.options import CAMERA_MODES, IMAGE_MODES, ExportOptions  # noqa: F401  (re-exported)
from quantvggt.prediction import SceneError, ScenePrediction

if TYPE_CHECKING:
    import pycolmap

log = logging.getLogger(__name__)

# Tracks need more seed pixels than points wanted: duplicates of a stronger track and too-short tracks are dropped,
# and the spare seeds replace them so `max_points` is still reached when the scene has enough. Bounded so that the
# candidate observations (seeds x frames) stay in memory for 32-frame scenes at 518 px.
SEED_OVERSAMPLE = 2
# Robust loss of the bundle adjustment: Cauchy with a 1 px scale keeps observations at pixel centres (errors around
# 1 px) near least squares while a wrong depth-agreement match (several px) cannot pull the cameras.
BA_LOSS_SCALE_PX = 1.0
# Points whose rays span less than this stay where the depth maps put them during BA: at 10 deg a 1 px error moves a
# triangulated depth by ~3 % (f ~ 200 px), under the model's depth error; with every point free, BA moved
# narrow-baseline points off the surface (point accuracy 0.063 -> 0.091 of the scene extent on 10 synthetic scenes;
# 0.067 with this rule, AUC@30 unchanged).
BA_MIN_TRIANGULATION_DEG = 10.0
# COLMAP's database schema up to 3.11 (what `colmap database_creator` 3.8 makes; newer versions upgrade it on open)
_DATABASE_SCHEMA = """
CREATE TABLE cameras (camera_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, model INTEGER NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, params BLOB, prior_focal_length INTEGER NOT NULL);
CREATE TABLE images (image_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, name TEXT NOT NULL UNIQUE,
    camera_id INTEGER NOT NULL, prior_qw REAL, prior_qx REAL, prior_qy REAL, prior_qz REAL, prior_tx REAL,
    prior_ty REAL, prior_tz REAL, CONSTRAINT image_id_check CHECK(image_id >= 0 and image_id < 2147483647),
    FOREIGN KEY(camera_id) REFERENCES cameras(camera_id));
CREATE UNIQUE INDEX index_name ON images(name);
CREATE TABLE keypoints (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, cols INTEGER NOT NULL,
    data BLOB, FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE);
CREATE TABLE descriptors (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, cols INTEGER NOT NULL,
    data BLOB, FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE);
CREATE TABLE matches (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, cols INTEGER NOT NULL, data BLOB);
CREATE TABLE two_view_geometries (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, cols INTEGER NOT NULL,
    data BLOB, config INTEGER NOT NULL, F BLOB, E BLOB, H BLOB, qvec BLOB, tvec BLOB);
PRAGMA user_version = 3800;
"""
_PINHOLE = 1  # COLMAP's camera model id
# database.db is built in groups of image pairs whose matches fit this many MiB (ReconstructionOptions'
# memory_budget_mb replaces it): every pair at once peaked at 8.5 GB for a 600-frame scene
DATABASE_MEMORY_MB = 256
_MATCH_BYTES = 96  # working bytes per match of a group: partner, both indices, sort order, copies, the row's blob
_GATHER_BYTES = 64  # working bytes per gathered observation of a chunk of tracks
_CAMERA_SENSOR = 0  # COLMAP's sensor type id of a camera (rigs.bin / frames.bin)


def export_options(options: Any) -> ExportOptions:
    """The :class:`ExportOptions` part of any options object that has (some of) its fields."""
    if isinstance(options, ExportOptions):
        return options
    return ExportOptions(
        **{f.name: getattr(options, f.name) for f in fields(ExportOptions) if hasattr(options, f.name)}
    )


def _transform(T: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
    """``T [3, 4]`` applied to points given as coordinate arrays, by components.

    numpy's matmul with an inner size of 3 is 5-10x slower than these nine multiply-adds on 100k points.
    """
    return tuple(T[k, 0] * x + T[k, 1] * y + T[k, 2] * z + T[k, 3] for k in range(3))


_SQLITE_FULL, _SQLITE_IOERR = 13, 10  # sqlite3 primary result codes


def _database_error(path: Path, e: Exception) -> OSError:
    """sqlite's error writing ``path`` as an ``OSError`` (a full disk is ENOSPC), one line naming database.db.

    ``sqlite3.OperationalError`` is not an ``OSError``: a full disk while writing database.db used to escape every
    per-scene handler and end the whole batch.
    """
    from quantvggt.fsutil import OutputError

    code = getattr(e, "sqlite_errorcode", None)
    code = code & 0xFF if isinstance(code, int) else None
    if code == _SQLITE_FULL or "disk is full" in str(e):
        return OSError(errno.ENOSPC, f"No space left on device, writing {path.name}")
    if code == _SQLITE_IOERR:
        return OSError(errno.EIO, f"I/O error writing {path.name} (sqlite3: {e})")
    return OutputError(f"{path.name}: cannot write the COLMAP database (sqlite3: {type(e).__name__}: {e})")


# -- the model as arrays ---------------------------------------------------------------------------------------------
@dataclass
class ColmapModel:
    """A COLMAP sparse model as arrays. Camera, image and point ids are their index + 1."""

    camera_sizes: np.ndarray  # [C, 2] int (width, height) in original pixels
    camera_params: np.ndarray  # [C, 4] PINHOLE fx, fy, cx, cy in original pixels
    image_names: list[str]
    image_camera: np.ndarray  # [S] camera index of each image
    cam_from_world: np.ndarray  # [S, 3, 4]
    xyz: np.ndarray  # [N, 3]
    rgb: np.ndarray  # [N, 3] uint8
    obs_point: np.ndarray  # [M] point index of each observation (a track is the observations of one point)
    obs_image: np.ndarray  # [M] image index
    obs_xy: np.ndarray  # [M, 2] keypoint in original pixels
    _cache: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_points(self) -> int:
        """Number of 3D points."""
        return len(self.xyz)

    def track_lengths(self) -> np.ndarray:
        """Observations per point ``[N]``."""
        return np.bincount(self.obs_point, minlength=self.num_points)

    def residuals(self) -> np.ndarray:
        """Reprojection error of each observation ``[M]``, original pixels (cached: never edit the arrays in place)."""
        if "residuals" not in self._cache:
            S = len(self.image_names)
            out = np.empty(len(self.obs_point))
            order = np.argsort(self.obs_image, kind="stable")
            bounds = np.searchsorted(self.obs_image[order], np.arange(S + 1))
            for i in range(S):  # one small matrix product per image instead of a [M, 3, 3] gather
                idx = order[bounds[i] : bounds[i + 1]]
                X = self.xyz[self.obs_point[idx]]
                x, y, z = _transform(self.cam_from_world[i], X[:, 0], X[:, 1], X[:, 2])
                fx, fy, cx, cy = self.camera_params[self.image_camera[i]]
                with np.errstate(divide="ignore", invalid="ignore"):
                    du = fx * x / z + cx - self.obs_xy[idx, 0]
                    dv = fy * y / z + cy - self.obs_xy[idx, 1]
                out[idx] = np.where(z > 0, np.hypot(du, dv), np.inf)  # behind the camera: no projection
            self._cache["residuals"] = out
        return self._cache["residuals"]

    def point_errors(self) -> np.ndarray:
        """Mean reprojection error of each point over its track ``[N]`` (COLMAP's ``error`` column)."""
        n = np.maximum(self.track_lengths(), 1)
        return np.bincount(self.obs_point, weights=self.residuals(), minlength=self.num_points) / n

    def triangulation_angles(self) -> np.ndarray:
        """Spread of each point's viewing rays ``[N]`` in degrees: twice the largest angle to their mean direction."""
        centres = np.stack([-T[:, :3].T @ T[:, 3] for T in self.cam_from_world])
        rays = self.xyz[self.obs_point] - centres[self.obs_image]
        rays /= np.maximum(np.linalg.norm(rays, axis=1, keepdims=True), 1e-300)
        N = self.num_points
        mean = np.stack([np.bincount(self.obs_point, weights=rays[:, k], minlength=N) for k in range(3)], 1)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-300)
        angle = np.degrees(np.arccos(np.clip((rays * mean[self.obs_point]).sum(1), -1.0, 1.0)))
        out = np.zeros(N)
        np.maximum.at(out, self.obs_point, angle)
        return 2 * out

    def _point2d_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Observation order within images (by image, then point) and each observation's POINT2D_IDX."""
        order = np.argsort(self.obs_image * max(self.num_points, 1) + self.obs_point)  # by image, then point
        start = np.searchsorted(self.obs_image[order], np.arange(len(self.image_names)))
        idx = np.empty(len(order), np.int64)
        idx[order] = np.arange(len(order)) - start[self.obs_image[order]]
        return order, idx

    def write(self, folder: str | Path) -> Path:
        """Write ``cameras.bin``, ``images.bin``, ``points3D.bin`` (COLMAP 3.x) and ``rigs.bin``, ``frames.bin``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        C, S = len(self.camera_params), len(self.image_names)
        quat = mat_to_quat(torch.from_numpy(np.ascontiguousarray(self.cam_from_world[:, :, :3]))).numpy()
        wxyz = quat[:, [3, 0, 1, 2]]
        with open(folder / "cameras.bin", "wb") as f:
            f.write(struct.pack("<Q", C))
            for c in range(C):
                w, h = (int(v) for v in self.camera_sizes[c])
                f.write(struct.pack("<IiQQ4d", c + 1, _PINHOLE, w, h, *map(float, self.camera_params[c])))
        # a trivial rig per camera and a frame per image, as pycolmap >= 3.12 writes them; COLMAP 3.8 ignores both
        with open(folder / "rigs.bin", "wb") as f:
            f.write(struct.pack("<Q", C))
            for c in range(C):
                f.write(struct.pack("<IIiI", c + 1, 1, _CAMERA_SENSOR, c + 1))
        with open(folder / "frames.bin", "wb") as f:
            f.write(struct.pack("<Q", S))
            for i in range(S):
                cam = int(self.image_camera[i]) + 1
                pose = (*wxyz[i], *self.cam_from_world[i, :, 3])
                f.write(struct.pack("<II7dIiIQ", i + 1, cam, *map(float, pose), 1, _CAMERA_SENSOR, cam, i + 1))
        order, p2d = self._point2d_index()
        counts = np.bincount(self.obs_image, minlength=S)
        ends = np.cumsum(counts)
        kp = np.empty(len(order), np.dtype([("xy", "<f8", (2,)), ("id", "<u8")]))
        kp["xy"] = self.obs_xy[order]
        kp["id"] = self.obs_point[order] + 1
        with open(folder / "images.bin", "wb") as f:
            f.write(struct.pack("<Q", S))
            for i in range(S):
                pose = (*wxyz[i], *self.cam_from_world[i, :, 3])
                f.write(struct.pack("<I7dI", i + 1, *map(float, pose), int(self.image_camera[i]) + 1))
                f.write(self.image_names[i].encode() + b"\0")
                f.write(struct.pack("<Q", int(counts[i])))
                f.write(kp[ends[i] - counts[i] : ends[i]].tobytes())
        self._write_points(folder / "points3D.bin", p2d)
        return folder

    def _write_points(self, path: Path, p2d: np.ndarray) -> None:
        # records have a fixed size per track length, so each length is one structured array (file order is free)
        lengths = self.track_lengths()
        by_point = np.argsort(self.obs_point, kind="stable")
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        errors = self.point_errors()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", self.num_points))
            for L in np.unique(lengths):
                pts = np.flatnonzero(lengths == L)
                dt = np.dtype(
                    [
                        ("id", "<u8"),
                        ("xyz", "<f8", (3,)),
                        ("rgb", "u1", (3,)),
                        ("error", "<f8"),
                        ("n", "<u8"),
                        ("track", "<u4", (int(L), 2)),
                    ]
                )
                rec = np.empty(len(pts), dt)
                rec["id"] = pts + 1
                rec["xyz"] = self.xyz[pts]
                rec["rgb"] = self.rgb[pts]
                rec["error"] = errors[pts]
                rec["n"] = L
                obs = by_point[first[pts, None] + np.arange(L)[None]]
                rec["track"][..., 0] = self.obs_image[obs] + 1
                rec["track"][..., 1] = p2d[obs]
                f.write(rec.tobytes())

    def write_ply(self, path: str | Path) -> Path:
        """Binary PLY of the points: x, y, z, nx, ny, nz (zero), red, green, blue, as Gaussian-splatting reads it."""
        dt = np.dtype(
            [(k, "<f4") for k in ("x", "y", "z", "nx", "ny", "nz")] + [(k, "u1") for k in ("red", "green", "blue")]
        )
        v = np.zeros(self.num_points, dt)
        for k, col in zip("xyz", self.xyz.T):
            v[k] = col
        for k, col in zip(("red", "green", "blue"), self.rgb.T):
            v[k] = col
        props = "".join(
            f"property {'float' if dt[k].kind == 'f' else 'uchar'} {k}\n"
            for k in dt.names  # type: ignore[union-attr]
        )
        header = f"ply\nformat binary_little_endian 1.0\nelement vertex {self.num_points}\n{props}end_header\n"
        path = Path(path)
        with open(path, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(v.tobytes())
        return path

    def write_database(
        self, path: str | Path, memory_budget_mb: float | None = None, report: dict[str, Any] | None = None
    ) -> Path:
        """A COLMAP database (3.8 schema): the points2D as keypoints, every two observations of a track as a match.

        With it ``colmap point_triangulator`` (and ``mapper``) run on the workspace as exported. The matches are
        built and written one image and one group of partner images at a time, so the working memory stays under
        ``memory_budget_mb`` (default :data:`DATABASE_MEMORY_MB`) whatever the scene's size: building every pair at
        once took 8.5 GB for a 600-frame scene. ``report`` (a dict) receives the pair and match counts and the peak
        number of matches held at once. A full disk is an ``OSError`` (ENOSPC) naming database.db, not sqlite's own
        ``OperationalError``.
        """
        import sqlite3

        path = Path(path)
        path.unlink(missing_ok=True)
        budget = (memory_budget_mb or DATABASE_MEMORY_MB) * 2**20
        try:
            with contextlib.closing(sqlite3.connect(path)) as db, db:
                self._fill_database(db, budget, report if report is not None else {})
        except sqlite3.Error as e:
            raise _database_error(path, e) from e
        return path

    def _fill_database(self, db: Any, budget: float, report: dict[str, Any]) -> None:
        S = len(self.image_names)
        order, _ = self._point2d_index()
        counts = np.bincount(self.obs_image, minlength=S)
        ends = np.cumsum(counts)
        db.executescript(_DATABASE_SCHEMA)
        db.executemany(
            "INSERT INTO cameras VALUES (?, ?, ?, ?, ?, 1)",
            [
                (c + 1, _PINHOLE, int(w), int(h), self.camera_params[c].astype("<f8").tobytes())
                for c, (w, h) in enumerate(self.camera_sizes)
            ],
        )
        db.executemany(
            "INSERT INTO images (image_id, name, camera_id) VALUES (?, ?, ?)",
            [(i + 1, name, int(self.image_camera[i]) + 1) for i, name in enumerate(self.image_names)],
        )
        for i in range(S):  # one image's keypoints at a time: a [M, 2] float32 copy of every image is not needed
            xy = self.obs_xy[order[ends[i] - counts[i] : ends[i]]].astype("<f4")
            db.execute("INSERT INTO keypoints VALUES (?, ?, 2, ?)", (i + 1, int(counts[i]), xy.tobytes()))
        pairs = matches = peak = 0
        for i, group in self._track_pair_groups(order, counts, ends, budget):
            rows = [self._pair_row(i, j, m) for j, m in group]
            db.executemany("INSERT INTO two_view_geometries VALUES (?, ?, 2, ?, 2, ?, ?, ?, ?, ?)", rows)
            held = sum(len(m) for _, m in group)
            pairs, matches, peak = pairs + len(group), matches + held, max(peak, held)
        report.update(pairs=pairs, matches=matches, peak_matches_in_memory=peak, budget_mb=round(budget / 2**20, 3))

    def _track_pair_groups(
        self, order: np.ndarray, counts: np.ndarray, ends: np.ndarray, budget: float
    ) -> Iterator[tuple[int, list[tuple[int, np.ndarray]]]]:
        """Yield ``(i, [(j, matches [n, 2] uint32), ...])``: image pairs i < j sharing tracks, in bounded groups.

        Every two observations of a track are a match (POINT2D_IDX in image i, in image j). Within an image the
        points2D are sorted by point id (:meth:`_point2d_index`), so a point's POINT2D_IDX is its rank there. For
        image i the tracks through it are gathered in chunks of points and the partners j > i are split into groups
        whose matches fit ``budget`` bytes; each group is yielded, written and dropped before the next one.
        """
        S = len(self.image_names)
        lengths = self.track_lengths()
        by_point = np.lexsort((self.obs_image, self.obs_point))  # a track's observations in image order
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        point_of = self.obs_point[order]  # points of image i, ascending: rank = POINT2D_IDX
        p2d_of_obs = np.empty(len(order), np.int64)
        p2d_of_obs[order] = np.arange(len(order)) - (ends - counts)[self.obs_image[order]]
        max_matches = max(1, int(budget // _MATCH_BYTES))
        max_gather = max(1, int(budget // (2 * _GATHER_BYTES)))

        def gather(i: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            """(partner image j, POINT2D_IDX in i, in j) of the observations after image i, chunk by chunk."""
            pts = point_of[ends[i] - counts[i] : ends[i]]
            if pts.size == 0:
                return
            lens = lengths[pts]
            chunk = (np.cumsum(lens) - lens) // max_gather  # chunks of about max_gather observations
            cuts = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), pts.size]
            for start, stop in itertools.pairwise(cuts):
                n = lens[start:stop]
                offsets = np.repeat(first[pts[start:stop]] - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
                obs = by_point[offsets]
                j = self.obs_image[obs]
                a = np.repeat(np.arange(start, stop), n)
                keep = j > i
                yield j[keep], a[keep], p2d_of_obs[obs[keep]]

        for i in range(S - 1):
            covis = np.zeros(S, np.int64)
            for j, _, _ in gather(i):
                covis += np.bincount(j, minlength=S)
            partners = np.flatnonzero(covis)
            if partners.size == 0:
                continue
            # contiguous groups of partners of about max_matches matches (a single pair may exceed it: one row)
            n = covis[partners]
            group_of = (np.cumsum(n) - n) // max_matches
            for gi in np.unique(group_of):
                members = partners[group_of == gi]
                wanted = np.zeros(S, bool)
                wanted[members] = True
                js, as_, bs = [], [], []
                for j, a, b in gather(i):
                    sel = wanted[j]
                    js.append(j[sel])
                    as_.append(a[sel])
                    bs.append(b[sel])
                j, a, b = np.concatenate(js), np.concatenate(as_), np.concatenate(bs)
                srt = np.argsort(j, kind="stable")  # by partner; within it by POINT2D_IDX in i (gathered in order)
                j, a, b = j[srt], a[srt], b[srt]
                cuts = np.flatnonzero(np.diff(j)) + 1
                yield (
                    i,
                    [
                        (int(jj[0]), np.stack([aa, bb], 1).astype("<u4"))
                        for jj, aa, bb in zip(np.split(j, cuts), np.split(a, cuts), np.split(b, cuts))
                    ],
                )
                del js, as_, bs, j, a, b, srt

    def _pair_row(self, i: int, j: int, matches: np.ndarray) -> tuple:
        """pair_id, rows, inlier matches, F, E, H, qvec, tvec of images i < j from the model's own poses."""
        Ri, ti = self.cam_from_world[i, :, :3], self.cam_from_world[i, :, 3]
        Rj, tj = self.cam_from_world[j, :, :3], self.cam_from_world[j, :, 3]
        R = Rj @ Ri.T
        t = tj - R @ ti
        t = t / max(float(np.linalg.norm(t)), 1e-12)  # a calibrated two-view geometry has a unit baseline
        E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ R
        Ki, Kj = (self._calibration(int(self.image_camera[k])) for k in (i, j))
        F = np.linalg.inv(Kj).T @ E @ np.linalg.inv(Ki)
        q = mat_to_quat(torch.from_numpy(R[None])).numpy()[0]
        blob = lambda a: np.ascontiguousarray(a, "<f8").tobytes()
        pair_id = (i + 1) * 2147483647 + (j + 1)  # COLMAP's pair id of image ids i+1 < j+1
        return (
            pair_id,
            len(matches),
            matches.tobytes(),
            blob(F),
            blob(E),
            blob(np.eye(3)),
            blob(q[[3, 0, 1, 2]]),
            blob(t),
        )

    def _calibration(self, c: int) -> np.ndarray:
        fx, fy, cx, cy = self.camera_params[c]
        return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])

    def to_pycolmap(self) -> pycolmap.Reconstruction:
        """The model as a ``pycolmap.Reconstruction`` (written to a temporary folder and read back in C++)."""
        import pycolmap

        with tempfile.TemporaryDirectory(prefix="quantvggt-colmap-") as tmp:
            self.write(tmp)
            return pycolmap.Reconstruction(tmp)


@dataclass
class ColmapResult:
    """What :func:`to_colmap` built from a prediction, which it leaves untouched."""

    model: ColmapModel
    intrinsics: np.ndarray  # [S, 3, 3] model-pixel intrinsics of the cameras as written (shared cameras averaged)
    report: dict[str, Any]  # "points", "tracks", "reprojection_error", "ba", "cameras" for report.json
    seeds: np.ndarray | None = None  # [N, 2] (frame, flat model pixel) each point was made from, for evaluation

    @functools.cached_property
    def reconstruction(self) -> pycolmap.Reconstruction:
        """The model as a ``pycolmap.Reconstruction`` (built on first use)."""
        return self.model.to_pycolmap()


# -- points and tracks -----------------------------------------------------------------------------------------------
def _valid_content_mask(tf: ImageTransform, size: tuple[int, int], H: int, W: int) -> np.ndarray:
    """Model pixels whose centres fall inside the original image (excludes padding)."""
    x = (np.arange(W) + 0.5 - tf.ox) / tf.sx  # the map is separable: columns and rows are tested on their own
    y = (np.arange(H) + 0.5 - tf.oy) / tf.sy
    return ((y >= 0) & (y < size[1]))[:, None] & ((x >= 0) & (x < size[0]))[None, :]


@dataclass
class _PixelPoints:
    """Per model pixel: depth of its point in its own camera, confidence, and whether it passes; points on demand."""

    depth: np.ndarray  # [S, H*W] z in the frame's own camera: what another frame's projection is compared with
    conf: np.ndarray  # [S, H*W]
    keep: np.ndarray  # [S, H*W] in the image, finite, and above the confidence threshold
    stats: dict[str, Any]
    W: int
    extrinsics: np.ndarray  # [S, 3, 4]
    intrinsics: np.ndarray  # [S, 3, 3] model pixels
    world: np.ndarray | None = None  # [S, H*W, 3] the point map (points_from="point_map"); None: unproject depth

    def xyz(self, frame: np.ndarray, pixel: np.ndarray) -> np.ndarray:
        """World points ``[n, 3]`` of the given pixels (only those are unprojected: a scene has millions)."""
        if self.world is not None:
            return self.world[frame, pixel].astype(np.float64)
        out = np.empty((frame.size, 3))
        order = np.argsort(frame, kind="stable")
        bounds = np.searchsorted(frame[order], np.arange(len(self.depth) + 1))
        for i in range(len(self.depth)):
            idx = order[bounds[i] : bounds[i + 1]]
            if idx.size == 0:
                continue
            d = self.depth[i, pixel[idx]]
            K = self.intrinsics[i]
            x = (pixel[idx] % self.W + 0.5 - K[0, 2]) / K[0, 0] * d  # pixel centres, as geometry.unproject_depth(0.5)
            y = (pixel[idx] // self.W + 0.5 - K[1, 2]) / K[1, 1] * d
            R, t = self.extrinsics[i, :, :3], self.extrinsics[i, :, 3]
            world_from_cam = np.concatenate([R.T, -R.T @ t[:, None]], 1)
            out[idx] = np.stack(_transform(world_from_cam, x, y, d), -1)
        return out


def _pixel_points(pred: ScenePrediction, options: ExportOptions) -> _PixelPoints:
    S, H, W = pred.depth.shape
    world = None
    if options.points_from == "point_map":
        if pred.world_points is None or pred.world_points_conf is None:
            raise SceneError(f"{pred.scene}: the model has no point head; use points_from='depth'")
        world = pred.world_points.reshape(S, -1, 3)
        conf = pred.world_points_conf
        depth = np.stack([_transform(pred.extrinsics[i], *world[i].T.astype(np.float64))[2] for i in range(S)])
        usable = np.isfinite(world).all(-1).reshape(S, H, W)  # a point map may put points behind its camera
    else:
        depth = pred.depth.astype(np.float64)
        conf = pred.depth_conf
        usable = np.isfinite(depth) & (depth > 0)
    depth = depth.reshape(S, H, W)
    valid = np.stack([_valid_content_mask(tf, sz, H, W) for tf, sz in zip(pred.transforms, pred.original_sizes)])
    finite = np.isfinite(conf) & np.isfinite(depth)  # a point map's NaN carries into its depth
    broken = int((valid & ~finite).sum())
    if valid.any() and broken == int(valid.sum()):
        # NaN weights gave NaN maps, and those a model of 0 points with exit 0
        raise SceneError(
            f"{pred.scene}: the model predicted no finite depth or confidence (NaN or inf in all {broken} pixels);"
            " its weights are broken: check the checkpoint"
        )
    if broken:
        log.warning("%s: %d predicted pixels are NaN or inf; they give no points", pred.scene, broken)
    valid &= usable & np.isfinite(conf)
    vals = conf[valid]
    # one partial sort for the threshold percentile and the median
    pct, median = np.percentile(vals, [options.conf_percentile, 50.0]) if vals.size else (np.inf, None)
    threshold = options.conf_threshold if options.conf_threshold is not None else float(pct)
    keep = valid & (conf >= threshold)
    stats = {
        "threshold": float(threshold),
        "min": float(vals.min()) if vals.size else None,
        "median": float(median) if vals.size else None,
        "max": float(vals.max()) if vals.size else None,
        "candidates": int(valid.sum()),
        "non_finite": broken,
        "above_threshold": int(keep.sum()),
    }
    return _PixelPoints(
        depth.reshape(S, -1),
        conf.reshape(S, -1),
        keep.reshape(S, -1),
        stats,
        W,
        pred.extrinsics.astype(np.float64),
        pred.intrinsics.astype(np.float64),
        world,
    )


def _subsample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` of ``range(n)`` at random, sorted (the subset numpy's default ``choice`` draws, without its shuffle)."""
    return np.sort(rng.choice(n, k, replace=False, shuffle=False))


def select_points(pred: ScenePrediction, options: ExportOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Choose 3D points: -> (frame index, flat pixel index, xyz) per point, plus confidence statistics."""
    pp = _pixel_points(pred, export_options(options))
    f, flat = np.nonzero(pp.keep)
    if f.size > options.max_points:
        sel = _subsample(np.random.default_rng(options.seed), f.size, options.max_points)
        f, flat = f[sel], flat[sel]
    return f, flat, pp.xyz(f, flat), pp.stats


@dataclass
class Tracks:
    """3D points from seed pixels and the pixels of every frame that observe them (model pixels, flat indices)."""

    seed_frame: np.ndarray  # [N] the frame whose pixel made the point
    seed_pixel: np.ndarray  # [N]
    xyz: np.ndarray  # [N, 3]
    obs_point: np.ndarray  # [M] point index (each point observes its own seed pixel too)
    obs_frame: np.ndarray  # [M]
    obs_pixel: np.ndarray  # [M]
    report: dict[str, Any]


def _first_per_pixel(gpix: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Indices of the candidates that win their pixel: the lowest ``rank`` among those with the same ``gpix``.

    The winners come out sorted by pixel.
    """
    if gpix.size == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(gpix * (int(rank.max()) + 1) + rank)  # one int64 key sorts by pixel, then rank
    g = gpix[order]
    first = np.empty(g.size, bool)
    first[0] = True
    np.not_equal(g[1:], g[:-1], out=first[1:])
    return order[first]


def build_tracks(
    pp: _PixelPoints, extrinsics: np.ndarray, intrinsics: np.ndarray, W: int, options: ExportOptions
) -> Tracks:
    """Multi-view tracks: seeds projected into every frame, observed where depth agrees; one track per pixel.

    A contested pixel goes to the track that agrees with more frames (then the more confident one); a seed whose own
    pixel goes to another track duplicates that track's point and is dropped. A point is the confidence-weighted
    mean of its observers' points (pixel centres unprojected with their own depth, or their point-map entries).
    """
    S, HW = pp.keep.shape
    H = HW // W
    f, flat = np.nonzero(pp.keep)
    rng = np.random.default_rng(options.seed)
    n_seeds_max = SEED_OVERSAMPLE * options.max_points
    if f.size > n_seeds_max:
        sel = _subsample(rng, f.size, n_seeds_max)
        f, flat = f[sel], flat[sel]
    N = f.size
    xyz = pp.xyz(f, flat)
    cols = [np.ascontiguousarray(c) for c in xyz.T]
    cand_n, cand_g = [], []
    for j in range(S):
        x, y, z = _transform(extrinsics[j], *cols)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = intrinsics[j, 0, 0] * x / z + intrinsics[j, 0, 2]
            v = intrinsics[j, 1, 1] * y / z + intrinsics[j, 1, 2]
        ok = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        pix = np.floor(np.where(ok, v, 0)).astype(np.int64) * W + np.floor(np.where(ok, u, 0)).astype(np.int64)
        ok &= pp.keep[j, pix] & (np.abs(pp.depth[j, pix] - z) <= options.track_tolerance * z)
        own = f == j  # a seed always observes its own pixel, wherever its point projects (point maps need not agree)
        pix[own] = flat[own]
        ok |= own
        cand_n.append(np.flatnonzero(ok))
        cand_g.append(j * HW + pix[ok])
    cn, cg = np.concatenate(cand_n), np.concatenate(cand_g)
    # priority for a contested pixel: the seed that agrees with the most frames, then the most confident one
    # (longest tracks first; confidence-first gave mean lengths ~0.2 shorter on the synthetic 8-frame scenes)
    rank = np.empty(N, np.int64)
    rank[np.lexsort((-pp.conf[f, flat], -np.bincount(cn, minlength=N)))] = np.arange(N)
    seed_g = f * HW + flat
    win = _first_per_pixel(cg, rank[cn])
    # which seeds kept their own pixel (always a candidate of theirs); the winners come sorted by pixel
    won_g, won_n = cg[win], cn[win]
    pos = np.searchsorted(won_g, seed_g)
    alive = won_n[pos] == np.arange(N)
    merged = int((~alive).sum())
    # second pass without the duplicates, so pixels they had won go to the next track
    sel = alive[cn]
    cn0, cg0 = cn[sel], cg[sel]
    cn, cg = cn0, cg0
    win = _first_per_pixel(cg, rank[cn])
    cn, cg = cn[win], cg[win]
    lengths = np.bincount(cn, minlength=N)
    good = alive & (lengths >= options.min_track_length)
    short = int((alive & ~good).sum())
    if short:  # third pass: pixels the too-short tracks held go to the others (a remaining track never loses one)
        sel = good[cn0]
        cn, cg = cn0[sel], cg0[sel]
        win = _first_per_pixel(cg, rank[cn])
        cn, cg = cn[win], cg[win]
    points = np.flatnonzero(good)
    if points.size > options.max_points:
        points = points[_subsample(rng, points.size, options.max_points)]
    index = np.full(N, -1, np.int64)
    index[points] = np.arange(points.size)
    keep_obs = index[cn] >= 0
    obs_point = index[cn[keep_obs]]
    obs_g = cg[keep_obs]
    lengths = np.bincount(obs_point, minlength=points.size)
    report = {
        "enabled": True,
        "tolerance": options.track_tolerance,
        "min_length": options.min_track_length,
        "seeds": int(N),
        "merged_duplicates": merged,
        "dropped_short": short,
        "observations": int(obs_point.size),
        **_length_stats(lengths),
    }
    obs_f, obs_pix = obs_g // HW, obs_g % HW
    # the point is where its observers' depth maps put it, confidence-weighted: fusing the views moved points up to
    # 14 % closer to the true surface on the synthetic scenes (the seed's own depth alone is noisier)
    w = pp.conf[obs_f, obs_pix].astype(np.float64)
    X = pp.xyz(obs_f, obs_pix)
    wsum = np.bincount(obs_point, weights=w, minlength=points.size)
    fused = np.stack([np.bincount(obs_point, weights=w * X[:, k], minlength=points.size) for k in range(3)], 1)
    fused = np.where(wsum[:, None] > 0, fused / np.maximum(wsum, 1e-300)[:, None], xyz[points])
    return Tracks(f[points], flat[points], fused, obs_point, obs_f, obs_pix, report)


def _length_stats(lengths: np.ndarray) -> dict[str, Any]:
    if lengths.size == 0:
        return {"mean_length": 0.0, "median_length": 0.0, "max_length": 0, "length_histogram": {}}
    counts = np.bincount(lengths)
    return {
        "mean_length": round(float(lengths.mean()), 4),
        "median_length": float(np.median(lengths)),
        "max_length": int(lengths.max()),
        "length_histogram": {str(v): int(counts[v]) for v in np.flatnonzero(counts)},
    }


def single_view_tracks(pp: _PixelPoints, options: ExportOptions) -> Tracks:
    """One observation per point (``tracks=False``): the seed pixel only, as the feed-forward export always did."""
    f, flat = np.nonzero(pp.keep)
    if f.size > options.max_points:
        sel = _subsample(np.random.default_rng(options.seed), f.size, options.max_points)
        f, flat = f[sel], flat[sel]
    n = np.arange(f.size)
    report = {"enabled": False, "seeds": int(f.size), "observations": int(f.size), **_length_stats(np.ones_like(n))}
    return Tracks(f, flat, pp.xyz(f, flat), n, f, flat, report)


# -- cameras and the model -------------------------------------------------------------------------------------------
def colmap_cameras(pred: ScenePrediction, tol: float, mode: str = "auto") -> list[int]:
    """Camera index per image: one per image size, split where sorted focal lengths jump by more than ``tol``.

    ``mode="single"`` keeps one camera per image size, ``"per-image"`` gives every image its own. Clustering on
    gaps (rather than distance to the first member) does not depend on the image order.
    """
    S = len(pred.names)
    if mode == "per-image":
        return list(range(S))
    focal = np.array(
        [
            np.sqrt(np.prod(np.diag(tf.intrinsics_to_original(pred.intrinsics[i]))[:2]))
            for i, tf in enumerate(pred.transforms)
        ]
    )
    sizes = [tuple(int(v) for v in sz) for sz in pred.original_sizes]
    assign = [-1] * S
    n = 0
    for size in dict.fromkeys(sizes):  # first-seen order keeps camera ids stable
        members = sorted((i for i in range(S) if sizes[i] == size), key=lambda i: focal[i])
        prev = None
        for i in members:
            if prev is not None and (mode == "single" or focal[i] <= focal[prev] * (1 + tol)):
                assign[i] = assign[prev]
            else:
                assign[i] = n
                n += 1
            prev = i
    # renumber in image order, so camera 1 is the first image's
    first: dict[int, int] = {}
    return [first.setdefault(a, len(first)) for a in assign]


def _check_cameras(pred: ScenePrediction) -> None:
    S = len(pred.names)
    bad = [
        pred.names[i]
        for i in range(S)
        if not (
            np.isfinite(pred.intrinsics[i]).all()
            and np.isfinite(pred.extrinsics[i]).all()
            and pred.intrinsics[i][0, 0] > 0
            and pred.intrinsics[i][1, 1] > 0
        )
    ]
    if bad:
        raise SceneError(
            f"{pred.scene}: the model predicted invalid cameras (non-finite pose or focal length) for {', '.join(bad)}"
        )


def _error_stats(res: np.ndarray) -> dict[str, float | None]:
    res = res[np.isfinite(res)]
    if res.size == 0:
        return {"mean": None, "median": None}
    return {"mean": round(float(res.mean()), 6), "median": round(float(np.median(res)), 6)}


def _name_is_safe(name: str) -> bool:
    """Whether COLMAP's text files (space-separated, one record per line) and its binary files can hold ``name``."""
    try:
        name.encode("utf-8")  # a file name that is not UTF-8 (kept as surrogates) cannot be written at all
    except UnicodeEncodeError:
        return False
    return not any(c.isspace() or unicodedata.category(c).startswith("C") for c in name)


def colmap_image_names(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Names COLMAP can hold: spaces, newlines, other control characters and non-UTF-8 bytes become ``_``.

    Returns the names and ``{new: original}`` for those renamed (reported, and ``images/`` links the new name to the
    original file). A name with a space was cut there by COLMAP's text reader, one with a newline broke the file.
    A renamed name that collides with another gets ``-2``, ``-3``, ... before its extension.
    """
    out: list[str] = []
    renamed: dict[str, str] = {}
    taken = {n for n in names if _name_is_safe(n)}
    for name in names:
        if _name_is_safe(name):
            out.append(name)
            continue
        clean = "".join("_" if not _name_is_safe(c) else c for c in name)
        stem, ext = os.path.splitext(clean)
        new, k = clean, 1
        while new in taken:
            k += 1
            new = f"{stem}-{k}{ext}"
        taken.add(new)
        out.append(new)
        renamed[new] = name
    return out, renamed


def to_colmap(pred: ScenePrediction, options: Any = None) -> ColmapResult:
    """Build the COLMAP model (PINHOLE cameras at original resolution, posed images, points with tracks).

    ``options`` is an :class:`ExportOptions` or anything with its fields (``ReconstructionOptions``). With
    ``options.ba`` the model is bundle adjusted (kept only where that does not raise the error it minimises).
    ``pred`` is not modified: the adjusted intrinsics and the report come back in the result.
    """
    opts = export_options(options if options is not None else ExportOptions())
    t0 = time.perf_counter()
    _check_cameras(pred)
    S, _H, W = pred.depth.shape
    cam_of = np.array(colmap_cameras(pred, opts.shared_camera_tol, opts.camera))
    C = int(cam_of.max()) + 1
    intrinsics = pred.intrinsics.copy()
    sizes = np.zeros((C, 2), np.int64)
    params = np.zeros((C, 4))
    for c in range(C):
        members = np.flatnonzero(cam_of == c)
        K = np.stack([pred.transforms[i].intrinsics_to_original(pred.intrinsics[i]) for i in members]).mean(0)
        for i in members:  # unproject with the camera actually written, so observations re-project exactly
            intrinsics[i] = pred.transforms[i].intrinsics_to_model(K)
        sizes[c] = pred.original_sizes[members[0]]
        params[c] = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    pp = _pixel_points(replace(pred, intrinsics=intrinsics), opts)
    if opts.tracks:
        tr = build_tracks(pp, pred.extrinsics, intrinsics, W, opts)
    else:
        tr = single_view_tracks(pp, opts)
    # keypoints at the centres of the observing pixels, in original pixels
    tf = np.array([[t.sx, t.sy, t.ox, t.oy] for t in pred.transforms])[tr.obs_frame]  # ImageTransform.to_original
    xy = np.stack([(tr.obs_pixel % W + 0.5 - tf[:, 2]) / tf[:, 0], (tr.obs_pixel // W + 0.5 - tf[:, 3]) / tf[:, 1]], -1)
    colors = pred.images.reshape(S, -1, 3)[tr.seed_frame, tr.seed_pixel]
    names, renamed = colmap_image_names(list(pred.names))
    if renamed:
        log.warning("%s: %d image names COLMAP cannot hold were renamed: %s", pred.scene, len(renamed), renamed)
    model = ColmapModel(
        camera_sizes=sizes,
        camera_params=params,
        image_names=names,
        image_camera=cam_of,
        cam_from_world=pred.extrinsics.astype(np.float64).copy(),
        xyz=tr.xyz.astype(np.float64),
        rgb=(colors * 255 + 0.5).clip(0, 255).astype(np.uint8),
        obs_point=tr.obs_point.astype(np.int64),
        obs_image=tr.obs_frame.astype(np.int64),
        obs_xy=xy,
    )
    report: dict[str, Any] = {
        "points": {"kept": model.num_points, "source": opts.points_from, "confidence": pp.stats},
        "tracks": tr.report,
        "reprojection_error": _error_stats(model.residuals()),
        "cameras": C,
        **({"renamed_images": renamed} if renamed else {}),
    }
    t1 = time.perf_counter()
    if opts.ba:
        model, report["ba"] = bundle_adjust(model, opts)
        for c in range(C):  # the refined focal lengths, back in model pixels
            K = np.array([[params[c, 0], 0, params[c, 2]], [0, params[c, 1], params[c, 3]], [0, 0, 1.0]])
            K[0, 0], K[1, 1] = model.camera_params[c, :2]
            for i in np.flatnonzero(cam_of == c):
                intrinsics[i] = pred.transforms[i].intrinsics_to_model(K)
    report["export_seconds"] = {"model": round(t1 - t0, 4), "ba": round(time.perf_counter() - t1, 4)}
    return ColmapResult(model, intrinsics, report, np.stack([tr.seed_frame, tr.seed_pixel], 1))


# -- bundle adjustment -----------------------------------------------------------------------------------------------
def _cauchy_cost(res: np.ndarray, scale: float = BA_LOSS_SCALE_PX) -> float:
    """Ceres' Cauchy loss summed over residuals: what the bundle adjustment minimises (0.5 * sum rho(r^2))."""
    b = scale * scale
    return float(0.5 * np.sum(b * np.log1p(res[np.isfinite(res)] ** 2 / b)))


def bundle_adjust(model: ColmapModel, options: ExportOptions) -> tuple[ColmapModel, dict[str, Any]]:
    """Refine poses, focal lengths (shared per camera) and points with pycolmap; principal points and gauge fixed.

    Points seen under less than ``BA_MIN_TRIANGULATION_DEG`` stay constant (they still constrain the cameras).

    Returns the refined model, or ``model`` itself when the adjustment failed or raised the robust cost, and a
    report with the reprojection error before and after (mean, median, per image) and the solver's verdict.
    """
    import pycolmap

    t0 = time.perf_counter()
    before = model.residuals()
    report: dict[str, Any] = {"enabled": True, "loss": f"cauchy({BA_LOSS_SCALE_PX} px)"}
    lengths = model.track_lengths()
    if not (lengths >= 2).any():
        report.update(accepted=False, reason="no point has a track of 2 or more observations")
        log.warning("bundle adjustment skipped: %s", report["reason"])
        return model, {**report, "before": _error_stats(before)}
    rec = model.to_pycolmap()
    ba = pycolmap.BundleAdjustmentOptions()
    ba.refine_focal_length = True
    ba.refine_principal_point = False  # VGGT's principal point is the image centre by construction
    ba.refine_extra_params = False
    ba.print_summary = False
    ba.min_track_length = 2  # single observations carry no constraint, only a free depth
    ba.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    ba.ceres.loss_function_scale = BA_LOSS_SCALE_PX
    ba.ceres.solver_options.max_num_iterations = options.ba_iterations
    config = pycolmap.BundleAdjustmentConfig()
    for image_id in rec.reg_image_ids():
        config.add_image(image_id)
    narrow = model.triangulation_angles() < BA_MIN_TRIANGULATION_DEG
    for point_id in np.flatnonzero(narrow & (lengths >= 2)) + 1:
        config.add_constant_point(int(point_id))
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    report["constant_points"] = int((narrow & (lengths >= 2)).sum())
    summary = pycolmap.create_default_bundle_adjuster(ba, config, rec).solve()
    termination = summary.termination_type.name
    report.update(termination=termination, converged=termination == "CONVERGENCE")
    refined = replace(
        model,
        camera_params=np.array([rec.camera(c + 1).params[:4] for c in range(len(model.camera_params))]),
        cam_from_world=np.stack([rec.image(i + 1).cam_from_world().matrix() for i in range(len(model.image_names))]),
        xyz=_points_xyz(rec, model.num_points),
    )
    after = refined.residuals()
    cost0, cost1 = _cauchy_cost(before), _cauchy_cost(after)
    usable = bool(summary.is_solution_usable()) and np.isfinite(refined.xyz).all() and np.isfinite(cost1)
    accepted = usable and cost1 <= cost0
    report.update(
        accepted=accepted,
        cost_before=round(cost0, 6),
        cost_after=round(cost1, 6),
        before=_error_stats(before),
        after=_error_stats(after),
        per_image=[
            {
                "image": name,
                "observations": int((model.obs_image == i).sum()),
                "before": _error_stats(before[model.obs_image == i]),
                "after": _error_stats(after[model.obs_image == i]),
            }
            for i, name in enumerate(model.image_names)
        ],
        seconds=round(time.perf_counter() - t0, 4),
    )
    if not report["converged"]:
        log.warning("bundle adjustment did not converge (%s)", termination)
    if not accepted:
        report["reason"] = "solution not usable" if not usable else "the robust cost went up"
        log.warning("bundle adjustment result discarded: %s; keeping the feed-forward model", report["reason"])
        return model, report
    return refined, report


def _points_xyz(rec: pycolmap.Reconstruction, n: int) -> np.ndarray:
    """Point positions by id 1..n from a reconstruction (pycolmap has no bulk accessor)."""
    xyz = np.full((n, 3), np.nan)
    for pid, p in rec.points3D.items():
        xyz[pid - 1] = p.xyz
    return xyz

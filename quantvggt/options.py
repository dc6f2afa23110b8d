"""Every option of a reconstruction, declared once: the CLI, the Prefect flows, prefect.yaml and the Ray workers all
take these objects.

- :class:`ExportOptions`: how a prediction becomes a COLMAP model and its workspace;
- :class:`ReconstructionOptions`: how a scene is read and predicted (whole or in chunks), plus the export fields;
- :class:`BatchOptions`: how a batch of scenes runs (Ray workers, collisions, allowed failures).

Each field carries its help text (``opt(..., help=...)``); :func:`add_arguments` turns a class into argparse options
(a bool defaulting to False is ``--name``, one defaulting to True is ``--no-name``), and Prefect renders the same
dataclasses as one typed parameter form and validates them (``__post_init__`` runs on every construction). Adding an
option is one field here; a deployed default is one more line in prefect.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

CAMERA_MODES = ("auto", "single", "per-image")
IMAGE_MODES = ("link", "copy", "none")
T = TypeVar("T")


def opt(default: Any, help: str, flag: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its help text and CLI flag (default ``--<name>``; ``cli=False``: not on the CLI)."""
    meta = {"help": help, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _finite(obj: Any, *names: str) -> None:
    # NaN passes every range check written with < and >, inf most of them (`--conf-threshold nan` wrote a model
    # with 0 points); so numbers must be finite first, and counts whole numbers, before any work is done
    for key in names:
        value = getattr(obj, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")


def _whole(obj: Any, *names: str) -> None:
    for key in names:
        value = getattr(obj, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be a whole number, got {value!r}")


def _choice(obj: Any, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class ExportOptions:
    """How a prediction becomes a COLMAP model and workspace (the export half of :class:`ReconstructionOptions`)."""

    points_from: Literal["depth", "point_map"] = opt(
        "depth", "3D points from depth unprojected with the predicted cameras, or from the point map head"
    )
    conf_percentile: float = opt(50.0, "keep points above this confidence percentile")
    conf_threshold: float | None = opt(None, "absolute confidence threshold (overrides the percentile)")
    max_points: int = opt(100_000, "at most this many 3D points")
    seed: int = opt(0, "seed of point subsampling", cli=False)
    # VGGT predicts focal length per frame: one physical camera's predictions scatter by a few percent (the shipped
    # small model's by up to ~4 %), while a zoom step or a different lens differs by well over 10 %
    camera: Literal["auto", "single", "per-image"] = opt(
        "auto", "COLMAP cameras: per image size and focal cluster (auto), one per image size (single), or per image"
    )
    shared_camera_tol: float = opt(
        0.08, "auto: a relative focal-length gap that starts a new camera", flag="--camera-tol"
    )
    tracks: bool = opt(True, "multi-view tracks (--no-tracks: one observation per point)")
    # the shipped small model's depth maps disagree between frames by 5-10 % (at 0.05 its 8-frame tracks averaged
    # 2.5-3 observations, at 0.1 about 3.3)
    track_tolerance: float = opt(0.1, "relative depth difference under which another frame observes a point")
    min_track_length: int = opt(2, "drop points seen by fewer frames (COLMAP's bundle_adjuster needs 2)")
    ba: bool = opt(False, "bundle-adjust poses, focal lengths and points (pycolmap)")
    ba_iterations: int = opt(100, "bundle adjustment iterations", cli=False)
    images: Literal["link", "copy", "none"] = opt(
        "link", "OUT/<scene>/images for COLMAP MVS and Gaussian splatting: absolute symlinks, copies, or none"
    )
    ply: bool = opt(True, "sparse/0/points3D.ply for point-cloud viewers and Gaussian-splatting trainers")
    database: bool = opt(True, "database.db with the tracks as matches (colmap point_triangulator / mapper)")
    text: bool = opt(False, "also write COLMAP text files")
    memory_budget_mb: float | None = opt(
        None,
        "memory one forward pass may use beyond the weights (lowers the single-pass limit and chunk size), and the "
        "export's working memory (database.db's matches; default 256 MB)",
    )
    formats: list[str] = opt(  # noqa: RUF009  (opt gives a default_factory for lists)
        [], "more export formats (quantvggt.export), e.g. nerfstudio", flag="--export"
    )

    def __post_init__(self) -> None:
        _finite(self, "conf_percentile", "conf_threshold", "shared_camera_tol", "track_tolerance", "memory_budget_mb")
        _whole(self, "max_points", "min_track_length", "ba_iterations", "seed")
        _choice(self, "camera", CAMERA_MODES)
        _choice(self, "points_from", ("depth", "point_map"))
        _choice(self, "images", IMAGE_MODES)
        if not 0 <= self.shared_camera_tol < 1:
            raise ValueError(f"shared_camera_tol must be in [0, 1), got {self.shared_camera_tol}")
        if not 0 <= self.conf_percentile < 100:
            raise ValueError(f"conf_percentile must be in [0, 100), got {self.conf_percentile}")
        if self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        if not self.track_tolerance > 0:
            raise ValueError(f"track_tolerance must be > 0, got {self.track_tolerance}")
        if self.min_track_length < 1:
            raise ValueError(f"min_track_length must be >= 1, got {self.min_track_length}")
        if self.ba_iterations < 1:
            raise ValueError(f"ba_iterations must be >= 1, got {self.ba_iterations}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if isinstance(self.formats, str):
            self.formats = [self.formats]
        self.formats = list(dict.fromkeys(self.formats))


@dataclass
class ReconstructionOptions(ExportOptions):
    """How a scene is read, predicted and exported (the export fields come from :class:`ExportOptions`)."""

    max_frames: int = opt(32, "single-pass limit; larger scenes are predicted in chunks (no image dropped)")
    chunking: Literal["sequential", "anchors"] = opt(
        "sequential",
        "large scenes: sequential overlapping windows (ordered captures) or anchor frames shared by every chunk",
    )
    chunk_size: int | None = opt(None, "frames per chunk (default: max_frames, or what memory_budget_mb allows)")
    overlap: int | None = opt(None, "sequential: frames shared by neighbouring chunks (default: chunk/4)")
    anchors: int | None = opt(None, "anchors: frames in every chunk (default: chunk/4)")
    anchor_select: Literal["even", "features"] = opt(
        "even", "anchors evenly spaced along the order, or by features (farthest-point on thumbnails)"
    )
    order: Literal["auto", "name", "similarity"] = opt(
        "auto",
        "chunk along file-name order, a chain of similar-looking frames (unordered collections), or auto: "
        "name order unless it jumps between unlike views",
    )
    max_align_residual: float = opt(
        0.3,
        "a chunk aligning worse than this (relative to the scene extent) is reported, not merged "
        "(up to 2x this when the shared frames' poses agree within 12 degrees)",
    )
    mode: Literal["crop", "pad"] = opt("crop", "preprocessing: center-crop or pad to the model's input")
    image_size: int | None = opt(None, "preprocessing width; default the model's own (518 for VGGT-1B)", cli=False)

    def __post_init__(self) -> None:
        _whole(self, "max_frames", "chunk_size", "overlap", "anchors", "image_size")
        super().__post_init__()
        _choice(self, "chunking", ("sequential", "anchors"))
        _choice(self, "anchor_select", ("even", "features"))
        _choice(self, "order", ("auto", "name", "similarity"))
        _choice(self, "mode", ("crop", "pad"))
        if not 0 < self.max_align_residual < math.inf:
            raise ValueError(f"max_align_residual must be a finite number > 0, got {self.max_align_residual}")
        if self.image_size is not None and (self.image_size < 14 or self.image_size % 14):
            raise ValueError(f"image_size must be a positive multiple of 14 (the patch size), got {self.image_size}")
        if self.max_frames < 2:
            raise ValueError(f"max_frames must be >= 2, got {self.max_frames}")
        if self.chunk_size is not None and self.chunk_size < 2:
            raise ValueError(f"chunk_size must be >= 2, got {self.chunk_size}")
        if self.overlap is not None and self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if self.anchors is not None and self.anchors < 1:
            raise ValueError(f"anchors must be >= 1, got {self.anchors}")
        if self.chunking == "anchors" and self.overlap is not None:
            raise ValueError("overlap applies to sequential chunking; anchors chunks share --anchors frames instead")
        if self.chunking == "sequential" and self.anchors is not None:
            raise ValueError("anchors applies to chunking='anchors'; sequential chunks share --overlap frames instead")
        chunk = self.chunk_size or self.max_frames
        if self.chunking == "sequential" and self.overlap is not None and self.overlap >= chunk:
            raise ValueError(f"overlap must be smaller than the chunk size ({chunk}), got {self.overlap}")
        if self.chunking == "anchors" and self.anchors is not None and self.anchors >= chunk:
            raise ValueError(f"anchors must be fewer than the chunk size ({chunk}), got {self.anchors}")


@dataclass
class BatchOptions:
    """How a batch of scenes runs: Ray workers, name collisions, failures the run may tolerate."""

    num_workers: int = opt(2, "Ray workers (each loads the model once)", flag="--workers")
    cpus_per_worker: int = opt(1, "Ray CPUs (and torch threads) per worker")
    in_flight: int = opt(
        2,
        "scenes or chunks a worker holds at once: one on the model, the others downloading, decoding or uploading "
        "(1 on CPU-only nodes whose every core runs a worker: nothing is left to overlap on)",
    )
    ray_address: str | None = opt(None, "Ray cluster to use (default: RAY_ADDRESS, else a local Ray)", cli=False)
    on_collision: Literal["error", "suffix"] = opt(
        "error", "two scene folders with the same name: fail them, or write <name>-<hash of the parent>"
    )
    allowed_failures: int = opt(0, "failed scenes that still let the run pass")
    force: bool = opt(False, "reconstruct scenes that are complete already")
    max_attempts: int = opt(3, "dispatches of a scene whose worker died", cli=False)
    kernels: dict[str, Any] | None = opt(  # noqa: RUF009  (None: no factory needed)
        None, "kernel options of the workers' model (quantvggt.lowbit.registry.KernelOptions fields)", cli=False
    )
    capacity_timeout_s: float = opt(
        300.0, "scenes waiting while no Ray worker is alive or placeable (a lost node) fail after this many seconds"
    )
    scene_timeout_s: float | None = opt(
        None,
        "a scene (or chunk) running longer on one worker is retried elsewhere (counted from dispatch, so it includes "
        "waiting behind the worker's other in-flight scene); default no limit",
    )

    def __post_init__(self) -> None:
        _whole(self, "num_workers", "cpus_per_worker", "in_flight", "allowed_failures", "max_attempts")
        _finite(self, "capacity_timeout_s", "scene_timeout_s")
        if self.kernels is not None:  # checked here (one line), applied in each worker
            from quantvggt.lowbit.registry import KernelOptions

            self.kernels = KernelOptions.from_dict(self.kernels).to_dict()
        if not self.capacity_timeout_s > 0 or (self.scene_timeout_s is not None and not self.scene_timeout_s > 0):
            raise ValueError("capacity_timeout_s and scene_timeout_s must be > 0")
        _choice(self, "on_collision", ("error", "suffix"))
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be a whole number >= 1, got {self.cpus_per_worker}")
        if self.in_flight < 1:
            raise ValueError(f"in_flight must be a whole number >= 1, got {self.in_flight}")
        if self.allowed_failures < 0:
            raise ValueError(f"allowed_failures must be >= 0, got {self.allowed_failures}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


def coerce(cls: type[T], value: T | dict[str, Any] | None) -> T:
    """``value`` as a ``cls`` (a dict of fields, an instance, or None for the defaults); one-line error for bad ones."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping of options, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**value)


def _choices(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    return None


def _base_type(tp: Any) -> Any:
    """``int`` for ``int | None`` and ``Optional[int]``; the type itself otherwise."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None, defaults: bool = True) -> None:
    """argparse options for every CLI field of the options dataclass ``cls`` (dest = the field name).

    With ``defaults=False`` an option not given is ``None`` in the namespace (a command that forwards only what the
    user set, e.g. to a deployment whose own defaults apply).
    """
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", False):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if tp is bool:
            if default:
                flag = "--no-" + flag.removeprefix("--")
                group.add_argument(flag, dest=f.name, action="store_false", default=True if defaults else None,
                                   help=help_text)  # fmt: skip
            else:
                group.add_argument(flag, dest=f.name, action="store_true", default=False if defaults else None,
                                   help=help_text)  # fmt: skip
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": help_text, "default": default if defaults else None}
        choices = _choices(tp)
        if choices:
            kw["choices"] = list(choices)
        elif get_origin(tp) is list:
            kw.update(action="append", default=None, type=str)
        elif tp in (int, float, str):
            kw["type"] = tp
        group.add_argument(flag, **kw)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An options object from the parsed CLI options of :func:`add_arguments` (fields not on the CLI: defaults)."""
    return cls(**given(cls, args), **overrides)


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` the parsed ``args`` set (neither absent nor None)."""
    out = {}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = value
    return out

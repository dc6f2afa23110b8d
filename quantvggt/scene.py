"""What happened to one scene (:class:`SceneResult`, one manifest row) and the scene URI -> output name mapping."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

Status = Literal["done", "skipped", "failed"]
STATUSES: tuple[str, ...] = typing.get_args(Status)


def scene_name(uri_or_path: str | os.PathLike[str]) -> str:
    """The output name of a scene: the last non-empty component of its normalised local path or URI.

    ``s3://bucket/inbox/scene_a/`` -> ``scene_a``; ``.`` -> the current folder's name. Raises ``ValueError`` when
    there is no usable name (empty input, a filesystem root, a bare bucket).
    """
    text = os.fspath(uri_or_path).strip()
    if not text:
        raise ValueError("empty scene path: cannot name its output")
    scheme, sep, rest = text.partition("://")
    if sep and scheme and "/" not in scheme:
        host, _, key = rest.partition("/")
        if scheme == "file":
            return _local_name(text, "/" + key)
        # keys are '/'-separated whatever the OS; normpath folds '.', '..' and doubled slashes
        norm = posixpath.normpath("/" + key)
        name = norm.rpartition("/")[2]
        if not name:
            raise ValueError(f"{text}: no scene folder in the URI (only {scheme}://{host})")
        return name
    return _local_name(text, text)


def _local_name(given: str, path: str) -> str:
    # abspath folds '.' and '..' lexically; unlike Path.resolve it keeps a symlinked scene folder's own name
    name = os.path.basename(os.path.abspath(os.path.expanduser(path)))
    if not name:
        raise ValueError(f"{given}: a filesystem root is not a scene folder")
    return name


@dataclass
class SceneResult:
    """The outcome of reconstructing one scene; one row of a run's Parquet manifest."""

    scene: str  # output name (see scene_name)
    status: Status = "failed"
    images: int = 0
    points: int = 0
    seconds: float = 0.0
    worker: str = ""
    attempt: int = 0
    error: str = ""
    output: str = ""  # where the scene's result folder is (local path or URI)
    report: str = ""  # its report.json
    source: str = ""  # the scene folder it was made from

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"scene {self.scene}: status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        """Whether the scene has a complete result (reconstructed now or earlier)."""
        return self.status != "failed"

    def to_row(self) -> dict[str, Any]:
        """A plain dict with one key per field (the manifest row)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SceneResult:
        """Inverse of :meth:`to_row`; fields missing or null in ``row`` (older manifests) take their defaults."""
        if not row.get("scene"):
            raise ValueError(f"manifest row has no scene name: {row}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known and v is not None})

    def summary(self) -> str:
        """One line for terminals: name, status, counts, time and the error if any."""
        return (
            f"{self.scene:20s} {self.status:8s} images={self.images} points={self.points} "
            f"{self.seconds:.1f}s {self.error}"
        ).rstrip()


def arrow_type(tp: Any) -> Any:
    """The pyarrow type of a field annotation: ``int``, ``float``, ``str``, ``bool``, string ``Literal``, optionals."""
    import pyarrow as pa

    scalars = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}
    if tp in scalars:
        return scalars[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal and args and all(isinstance(a, str) for a in args):
        return pa.string()
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return arrow_type(rest[0])
    raise TypeError(f"no Parquet column type for annotation {tp!r}")


def manifest_schema() -> Any:
    """The Parquet manifest's ``pyarrow.Schema``, one column per :class:`SceneResult` field, in field order."""
    import pyarrow as pa

    hints = typing.get_type_hints(SceneResult)
    return pa.schema([(f.name, arrow_type(hints[f.name])) for f in dataclasses.fields(SceneResult)])


def scene_label(uri_or_path: str | os.PathLike[str]) -> str:
    """:func:`scene_name`, or the URI itself when it has no usable name (its row still says why it failed)."""
    try:
        return scene_name(uri_or_path)
    except ValueError:
        return os.fspath(uri_or_path)


def scene_source_key(uri_or_path: str | os.PathLike[str]) -> str:
    """A normalised identity for a scene source: absolute local path, or the URI without trailing slashes."""
    s = os.fspath(uri_or_path)
    if "://" in s:
        return s.rstrip("/")
    return os.path.abspath(s)


# one wording for a name collision, wherever it is found (CLI, flows, the scene path)
COLLISION_HINT = (
    "rename one, or set on_collision to suffix (--on-collision suffix) to write <name>-<hash of its parent>"
)


def collision_error(output: str, other_source: str | None) -> str:
    """The message for ``output`` holding another scene folder's result under the same name."""
    return f"{output} holds the result of another scene folder with the same name ({other_source}); {COLLISION_HINT}"


def output_names(scenes: list[str], on_collision: Literal["error", "suffix"] = "error") -> dict[str, str]:
    """Map each scene source to a unique output name (:func:`scene_name`), refusing or resolving collisions.

    Two sources with the same folder name (``in/scene_000`` and ``other/scene_000``) would write the same
    ``OUT/scene_000``: with ``on_collision="error"`` that is a ``ValueError`` naming both; with ``"suffix"``
    every colliding source gets ``<name>-<8 hex of its parent>``, the same whatever the order of the inputs.
    """
    if on_collision not in ("error", "suffix"):
        raise ValueError(f"on_collision must be 'error' or 'suffix', got {on_collision!r}")
    by_name: dict[str, list[str]] = {}
    for s in dict.fromkeys(scenes):
        by_name.setdefault(scene_name(s), []).append(s)
    out: dict[str, str] = {}
    for name, sources in by_name.items():
        keys = {scene_source_key(s) for s in sources}
        if len(keys) == 1:
            out.update({s: name for s in sources})
            continue
        if on_collision == "error":
            raise ValueError(
                f"scenes {', '.join(sorted(keys))} would all write the output folder {name!r}; {COLLISION_HINT}"
            )
        for s in sources:
            parent = scene_source_key(s).rpartition("/")[0]
            out[s] = f"{name}-{hashlib.sha1(parent.encode()).hexdigest()[:8]}"
    return out

"""The storage interface, the backend registry and what every backend shares (see :mod:`quantvggt.storage`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from quantvggt.images import IMAGE_EXTENSIONS
from quantvggt.scene import scene_source_key

log = logging.getLogger(__name__)
COMPLETE = "_COMPLETE.json"
LOCAL_SCHEMES = ("", "file")


class StorageError(RuntimeError):
    """A storage operation failed after retries, or data failed verification."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The key does not exist (the bucket does)."""


class StorageUnavailableError(StorageError):
    """The endpoint could not be reached, or kept failing or throttling, through the client's retries.

    The one storage failure that may pass later: callers that retry at a coarser level (a Prefect task) retry this
    and nothing else.
    """


def sha256_file(path: str | Path) -> str:
    """Streaming SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_join(root: str | Path, key: str, allow_root: bool = False) -> Path:
    """``root / key`` for a '/'-separated object key; a key that could land outside ``root`` raises StorageError.

    Every key-to-local-path mapping goes through here: keys come from listings of remote stores and must not
    write anywhere else. Refused: NUL bytes, absolute keys, ``..`` components, and the empty key (which maps to
    ``root`` itself) unless ``allow_root``. The check is lexical; symlinks already inside ``root`` are trusted.
    """
    root = Path(root)
    if not isinstance(key, str):
        raise StorageError(f"{key!r}: object key is not a string")
    why = ""
    if "\x00" in key:
        why = "contains a NUL byte"
    elif key.startswith(("/", "\\")):
        why = "is absolute"
    elif ".." in re.split(r"[/\\]", key):
        why = "has a '..' component"
    elif not allow_root and all(part in ("", ".") for part in key.split("/")):
        why = "is empty"
    if not why:
        dest = root / key
        norm_root, norm = os.path.normpath(root), os.path.normpath(dest)
        if norm == norm_root or norm.startswith(norm_root.rstrip(os.sep) + os.sep):
            return dest
        why = "leaves the folder"
    raise StorageError(f"object key {key!r} {why}: refusing to map it under {root}")


class ChecksumMismatch(StorageError):  # noqa: N818 (a public name callers already catch)
    """Downloaded bytes do not match the stored SHA-256."""


class Storage:
    """Base interface; keys are '/'-separated paths relative to the storage root."""

    root_uri: str

    def uri(self, key: str = "") -> str:
        """Full URI of ``key``."""
        return self.root_uri.rstrip("/") + ("/" + key.lstrip("/") if key else "")

    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        """Whole object."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic write of a small object."""
        raise NotImplementedError

    def download(self, key: str, dest: str | Path) -> Path:
        """Stream an object to a local file (checksum verified), written atomically."""
        raise NotImplementedError

    def upload(self, src: str | Path, key: str) -> str:
        """Stream a local file to ``key`` atomically; returns its SHA-256."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix``."""
        raise NotImplementedError

    def checksum(self, key: str) -> str:
        """A fingerprint of the stored object (its SHA-256 where the backend keeps one): cached copies compare it."""
        raise NotImplementedError

    def local_root(self) -> Path | None:
        """The local folder this storage is, or None for remote backends (their objects must be downloaded)."""
        return None

    # -- folders with completion records ---------------------------------------------------------------------
    def is_complete(self, prefix: str, source: str | None = None) -> bool:
        """Whether ``prefix`` holds a finished result (its completion record exists).

        With ``source``, only a result made from that source counts: a record naming another source (the same
        folder name under another prefix) is not complete for this one. Records without a source (older ones) count.
        """
        if source is None:
            return self.exists(f"{prefix.rstrip('/')}/{COMPLETE}")
        record = self.completion_record(prefix)
        return record is not None and record.get("source") in (None, "", scene_source_key(source))

    def completion_record(self, prefix: str) -> dict | None:
        """The completion record of ``prefix`` (files, checksums and what the writer added), or None if unfinished."""
        try:  # one read, not exists() then read: on S3 a GET also tells a missing bucket from a missing key
            data = self.read_bytes(f"{prefix.rstrip('/')}/{COMPLETE}")
        except (FileNotFoundError, NotADirectoryError):  # ObjectNotFoundError is a FileNotFoundError
            return None
        return json.loads(data)

    def upload_dir(self, local: str | Path, prefix: str, extra: dict | None = None) -> dict:
        """Upload a folder, then write its completion record last; returns the record."""
        local = Path(local)
        prefix = prefix.rstrip("/")
        files = {}
        for p in sorted(local.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local).as_posix()
                files[rel] = self.upload(p, f"{prefix}/{rel}")
        record = {"files": files, "completed_at": time.time(), **(extra or {})}
        self.write_bytes(f"{prefix}/{COMPLETE}", json.dumps(record, indent=1).encode())
        return record

    def download_dir(self, prefix: str, local: str | Path) -> Path:
        """Download every object under ``prefix`` (keeping relative paths)."""
        local = Path(local)
        prefix = prefix.rstrip("/")
        dests = {key: safe_join(local, key[len(prefix) + 1 :]) for key in self.list(prefix + "/")}  # all checked first
        for key, dest in dests.items():
            self.download(key, dest)
        return local


_BACKENDS: dict[str, Callable[[str], Storage]] = {}
_ENV: list[Callable[[], dict[str, str]]] = []


def register_backend(
    scheme: str, factory: Callable[[str], Storage], env: Callable[[], dict[str, str]] | None = None
) -> None:
    """Make ``scheme://...`` URIs open with ``factory(uri)``; ``env()`` lists the variables other processes need."""
    _BACKENDS[scheme] = factory
    if env is not None:
        _ENV.append(env)


def uri_scheme(uri: str | Path) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for ``file:///x``, ``''`` for a plain path."""
    text = str(uri)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head) else ""


def is_remote(uri: str | Path) -> bool:
    """Whether ``uri`` names a non-local store (its objects are downloaded to be read as files)."""
    return uri_scheme(uri) not in LOCAL_SCHEMES


def local_path(uri: str | Path) -> Path | None:
    """The local path ``uri`` names (a plain path or ``file://``), or None for a remote URI."""
    scheme = uri_scheme(uri)
    if scheme == "":
        return Path(str(uri)).expanduser()
    if scheme == "file":
        return Path(str(uri)[len("file://") :]).expanduser()
    return None


def open_storage(uri: str | Path) -> Storage:
    """The storage of ``uri``, by its scheme: a local folder, ``s3://``, ``memory://`` or a registered backend."""
    scheme = uri_scheme(uri)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_BACKENDS) if s) or "none"
        raise ValueError(f"{uri}: no storage backend for {scheme}:// (known: {known} and local paths)")
    return factory(str(uri))


def storage_env() -> dict[str, str]:
    """The environment variables that configure the backends here (e.g. ``AWS_*``), for other processes.

    Ray workers started before the user exported these (e.g. by ``infra/start-local.sh``) do not have them: pass
    this as a Ray ``runtime_env``'s ``env_vars``. On a real cluster prefer instance roles over exported keys, since
    a runtime_env is visible in Ray's job metadata.
    """
    out: dict[str, str] = {}
    for env in _ENV:
        out.update(env())
    return out


def split_uri(uri: str) -> tuple[Storage, str]:
    """(storage of the parent, last path component) — e.g. a scene URI into its inbox and scene name."""
    uri = str(uri).rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name:
        raise ValueError(f"{uri}: cannot split into parent and name")
    return open_storage(parent or "/"), name


def find_scenes(storage: Storage, prefix: str = "") -> list[str]:
    """Scene prefixes under ``prefix``: folders that directly hold image files (case-insensitive extensions)."""
    scenes, hidden = set(), set()
    for key in storage.list(prefix):
        p = PurePosixPath(key)  # "scene//a.png" (an empty S3 key part) is the scene "scene", as fetch_scene reads it
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if any(part.startswith((".", "_")) for part in p.parts[:-1]):
            hidden.add(str(p.parent))
        else:
            scenes.add(str(p.parent))
    if hidden:  # said, not silently dropped: _manifests/, .cache/ and the like are never scenes
        log.info(
            "left out %d image folders under %s whose path has a part starting with '_' or '.': %s",
            len(hidden),
            storage.uri(prefix),
            ", ".join(sorted(hidden)[:5]) + (" ..." if len(hidden) > 5 else ""),
        )
    return sorted(scenes)


def fetch_scene(storage: Storage, scene: str, local: str | Path) -> Path:
    """Download the files directly inside ``scene`` (not its subfolders) into folder ``local``."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    dests: dict[str, Path] = {}
    for key in storage.list(scene.rstrip("/") + "/"):
        rel = key[len(scene.rstrip("/")) + 1 :].lstrip("/")  # "scene//a.png": S3 allows empty key parts
        if "/" in rel or not rel:
            continue
        dest = safe_join(local, rel)  # every name checked before anything is written
        if dest in dests.values():  # "scene/a.png" and "scene//a.png": one file name, the first key wins
            log.warning("%s: same file name as another object of the scene; left out", storage.uri(key))
            continue
        dests[key] = dest
    for key, dest in dests.items():
        storage.download(key, dest)
    return local


def cache_dir() -> Path:
    """Local cache folder for downloaded objects (``QUANTVGGT_CACHE`` or ``~/.cache/quantvggt``)."""
    return Path(os.environ.get("QUANTVGGT_CACHE", Path.home() / ".cache" / "quantvggt"))


def download_to_cache(uri: str) -> Path:
    """Download an object, or every object under a prefix, of any remote store into the cache; return the local path.

    A cached copy is reused only when its recorded checksum matches the stored object's.
    """
    scheme = uri_scheme(uri)
    if "/" in uri[len(scheme) + 3 :].strip("/"):
        parent, name = split_uri(uri)
        keys = [k for k in parent.list(name) if k == name or k.startswith(name + "/")]
    else:  # a whole bucket
        parent, name = open_storage(uri), ""
        keys = parent.list("")
    if not keys:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    where = parent.uri()[len(scheme) + 3 :].strip("/")  # bucket/prefix of the parent
    root = cache_dir() / scheme
    for part in where.split("/"):
        root = safe_join(root, part)
    dests = {k: safe_join(root, k) for k in keys}  # every key checked before anything is written
    for k in keys:
        dest = dests[k]
        stamp = dest.with_name(dest.name + ".sha256")
        want = parent.checksum(k)
        if dest.is_file() and stamp.is_file() and stamp.read_text() == want:
            continue
        parent.download(k, dest)
        stamp.write_text(want)
    return safe_join(root, name, allow_root=True) if name else root


def expand_scene_uris(inputs: list[str]) -> list[str]:
    """Scene URIs from inputs that are scene folders/prefixes or roots holding scene folders."""
    out: list[str] = []
    for item in inputs:
        st = open_storage(item)
        scenes = find_scenes(st)
        if not scenes or scenes in (["."], [""]):
            # a scene itself (an empty one is reported as failed, not dropped); local paths absolute so '.' has a name
            out.append(str(item).rstrip("/") if is_remote(item) else os.path.abspath(local_path(item) or item))
        else:
            out += [st.uri(s) for s in scenes if s not in (".", "")]
    return sorted(dict.fromkeys(out))

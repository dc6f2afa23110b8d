"""One storage interface over local folders, ``s3://bucket/prefix`` and any backend registered here.

Every URI goes through :func:`open_storage`, which picks the backend by the URI's scheme (:func:`register_backend`):
plain paths and ``file://`` are local folders (:mod:`.local`), ``s3://`` is S3 or any S3-compatible service
(:mod:`.s3`, boto3), ``memory://`` an in-process store for tests and dry runs (:mod:`.memory`). A new backend (GCS
through ``pyarrow.fs`` or fsspec, say) is one module: a :class:`Storage` subclass plus one ``register_backend`` call,
and it must pass the shared suite in ``tests/test_storage_backends.py``.

Writes are atomic: an object is first written under a temporary key and then moved into place. A result folder counts
as done only when its completion record ``_COMPLETE.json`` exists, written last, listing every file with its
SHA-256; downloads verify the SHA-256 stored with each object.
"""

from quantvggt.storage import local, memory, s3  # the built-in backends; importing them registers them
from quantvggt.storage.base import (
    COMPLETE,
    ChecksumMismatch,
    ObjectNotFoundError,
    Storage,
    StorageError,
    StorageUnavailableError,
    cache_dir,
    download_to_cache,
    expand_scene_uris,
    fetch_scene,
    find_scenes,
    is_remote,
    local_path,
    open_storage,
    register_backend,
    safe_join,
    sha256_file,
    split_uri,
    storage_env,
    uri_scheme,
)
from quantvggt.storage.local import LocalStorage
from quantvggt.storage.memory import MemoryStorage
from quantvggt.storage.s3 import S3Storage, parse_s3_uri, s3_call, s3_client, s3_endpoint, s3_error_reason

__all__ = [
    "COMPLETE",
    "ChecksumMismatch",
    "LocalStorage",
    "MemoryStorage",
    "ObjectNotFoundError",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnavailableError",
    "cache_dir",
    "download_to_cache",
    "expand_scene_uris",
    "fetch_scene",
    "find_scenes",
    "is_remote",
    "local",
    "local_path",
    "memory",
    "open_storage",
    "parse_s3_uri",
    "register_backend",
    "s3",
    "s3_call",
    "s3_client",
    "s3_endpoint",
    "s3_error_reason",
    "safe_join",
    "sha256_file",
    "split_uri",
    "storage_env",
    "uri_scheme",
]

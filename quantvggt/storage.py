"""One storage interface over local folders and ``s3://bucket/prefix`` (boto3; S3-compatible endpoints work).

Endpoint, region and credentials come from the standard AWS chain; ``QUANTVGGT_S3_ENDPOINT`` (or
``AWS_ENDPOINT_URL``) points at MinIO, moto or another S3-compatible service.

Writes are atomic: an object is first written under a temporary key and then copied into place (locally: a
temporary file renamed). A result folder counts as done only when its completion record ``_COMPLETE.json``
exists, written last, listing every file with its SHA-256; downloads verify the SHA-256 stored with each object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from quantvggt.fsutil import atomic_file, atomic_write_bytes
from quantvggt.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)
T = TypeVar("T")
COMPLETE = "_COMPLETE.json"


class StorageError(RuntimeError):
    """A storage operation failed after retries, or data failed verification."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name")
    return bucket, key


def s3_client() -> Any:
    """A boto3 S3 client honouring ``QUANTVGGT_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL`` with adaptive retries."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("QUANTVGGT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 8, "mode": "adaptive"}))


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


_TRANSIENT_CODES = ("Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "TooManyRequests")
_DENIED_CODES = (
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
)


def s3_error_reason(error: Any) -> str | None:
    """One-line reason for a permanent S3 error a user can fix (bucket, credentials), else None."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return "bucket does not exist"
    if code == "InvalidBucketName":
        return "invalid bucket name"
    if code in _DENIED_CODES:
        return "access denied (check AWS credentials)" + ("" if code in ("403", "AccessDenied") else f" [{code}]")
    return None


def _is_transient(error: Any) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status >= 500 or status == 429 or code in _TRANSIENT_CODES


def _location(what: str) -> str:
    # ``what`` reads "<verb> s3://bucket/key": errors name the object, as the CLI prints them on one line
    i = what.find("s3://")
    return what[i:] if i >= 0 else what


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn`` with exponential backoff on transient errors (connection problems, 5xx, throttling).

    Errors a retry cannot fix fail at once: a missing bucket, denied access or missing credentials become a
    one-line :class:`StorageError`; other client errors (e.g. a missing key's 404) propagate unchanged.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    for i in range(attempts):
        try:
            return fn()
        except (ClientError, S3UploadFailedError) as e:
            ce = e if isinstance(e, ClientError) else e.__context__  # upload_file wraps the ClientError
            if not isinstance(ce, ClientError):
                raise StorageError(f"{what}: {e}") from e
            reason = s3_error_reason(ce)
            if reason is not None:
                raise StorageError(f"{_location(what)}: {reason}") from e
            if not _is_transient(ce) or i == attempts - 1:
                raise
            err: Exception = e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StorageError(f"{_location(what)}: no usable AWS credentials found (check AWS credentials)") from e
        except (EndpointConnectionError, BotoConnectionError, ChecksumMismatch) as e:
            if i == attempts - 1:
                raise StorageError(f"{what}: {e}") from e
            err = e
        delay = base_delay * 2**i
        log.warning("%s failed (%s); retrying in %.1fs", what, err, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


class ChecksumMismatch(StorageError):
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

    # -- folders with completion records ---------------------------------------------------------------------
    def is_complete(self, prefix: str) -> bool:
        """Whether ``prefix`` holds a finished result (its completion record exists)."""
        return self.exists(f"{prefix.rstrip('/')}/{COMPLETE}")

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


class LocalStorage(Storage):
    """A local folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root_uri = str(self.root)

    def _p(self, key: str) -> Path:
        return safe_join(self.root, key.lstrip("/"), allow_root=True)  # keys are root-relative; "" is the root

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in start.rglob("*") if p.is_file()]
        return sorted(
            k for k in keys if k.startswith(prefix.lstrip("/")) and not PurePosixPath(k).name.startswith(".tmp-")
        )

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    # atomic_file's temporaries are named .tmp-<name>.<random>, which list() leaves out
    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._p(key), data)

    def download(self, key: str, dest: str | Path) -> Path:
        with atomic_file(dest) as tmp:
            shutil.copyfile(self._p(key), tmp)
        return Path(dest)

    def upload(self, src: str | Path, key: str) -> str:
        with atomic_file(self._p(key)) as tmp:
            shutil.copyfile(src, tmp)
            digest = sha256_file(tmp)
        return digest

    def delete_prefix(self, prefix: str) -> None:
        p = self._p(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.is_file():
            p.unlink()


class S3Storage(Storage):
    """``s3://bucket/prefix``."""

    def __init__(self, uri: str) -> None:
        self.bucket, base = parse_s3_uri(uri)
        self.base = base.strip("/")
        self.root_uri = f"s3://{self.bucket}/{self.base}".rstrip("/")
        self.client = s3_client()

    def _k(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.base}/{key}" if self.base else key

    def list(self, prefix: str = "") -> list[str]:
        out = []
        full = self._k(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in retry(
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)), f"list {self.uri(prefix)}"
        ):
            for obj in page.get("Contents", []):
                k = obj["Key"][len(self.base) + 1 :] if self.base else obj["Key"]
                if not k.startswith(".tmp/"):
                    out.append(k)
        return sorted(out)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            retry(lambda: self.client.head_object(Bucket=self.bucket, Key=self._k(key)), f"head {self.uri(key)}")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                self._require_bucket(key)  # a HEAD 404 cannot tell a missing key from a missing bucket
                return False
            raise

    def _require_bucket(self, key: str) -> None:
        """Raise a one-line StorageError if the bucket is missing (checked once per instance)."""
        from botocore.exceptions import ClientError

        if getattr(self, "_bucket_ok", False):
            return
        try:
            retry(lambda: self.client.head_bucket(Bucket=self.bucket), f"head {self.uri(key)}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"{self.uri(key)}: bucket does not exist") from e
            raise
        self._bucket_ok = True

    def read_bytes(self, key: str) -> bytes:
        return retry(
            lambda: self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read(), f"get {self.uri(key)}"
        )

    def _commit(self, tmp_key: str, key: str) -> None:
        retry(
            lambda: self.client.copy_object(
                Bucket=self.bucket,
                Key=self._k(key),
                CopySource={"Bucket": self.bucket, "Key": tmp_key},
                MetadataDirective="COPY",
            ),
            f"commit {self.uri(key)}",
        )
        retry(
            lambda: self.client.delete_object(Bucket=self.bucket, Key=tmp_key), f"cleanup s3://{self.bucket}/{tmp_key}"
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        tmp_key = self._k(f".tmp/{uuid.uuid4().hex}")
        digest = hashlib.sha256(data).hexdigest()
        retry(
            lambda: self.client.put_object(Bucket=self.bucket, Key=tmp_key, Body=data, Metadata={"sha256": digest}),
            f"put {self.uri(key)}",
        )
        self._commit(tmp_key, key)

    def download(self, key: str, dest: str | Path) -> Path:
        dest = Path(dest)

        def once() -> Path:
            with atomic_file(dest) as tmp:  # a failed or mismatching download never reaches dest
                self.client.download_file(self.bucket, self._k(key), str(tmp))  # streamed, multipart for large objects
                want = self.client.head_object(Bucket=self.bucket, Key=self._k(key)).get("Metadata", {}).get("sha256")
                if want and sha256_file(tmp) != want:
                    raise ChecksumMismatch(f"{self.uri(key)}: SHA-256 mismatch after download")
            return dest

        return retry(once, f"download {self.uri(key)}")

    def upload(self, src: str | Path, key: str) -> str:
        digest = sha256_file(src)
        tmp_key = self._k(f".tmp/{uuid.uuid4().hex}")
        retry(
            lambda: self.client.upload_file(str(src), self.bucket, tmp_key, ExtraArgs={"Metadata": {"sha256": digest}}),
            f"upload {self.uri(key)}",
        )
        self._commit(tmp_key, key)
        return digest

    def delete_prefix(self, prefix: str) -> None:
        for k in self.list(prefix):
            retry(lambda k=k: self.client.delete_object(Bucket=self.bucket, Key=self._k(k)), f"delete {self.uri(k)}")


def open_storage(uri: str | Path) -> Storage:
    """Storage for a local folder or an ``s3://`` URI."""
    uri = str(uri)
    return S3Storage(uri) if uri.startswith("s3://") else LocalStorage(uri)


def split_uri(uri: str) -> tuple[Storage, str]:
    """(storage of the parent, last path component) — e.g. a scene URI into its inbox and scene name."""
    uri = str(uri).rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name:
        raise ValueError(f"{uri}: cannot split into parent and name")
    return open_storage(parent or "/"), name


def find_scenes(storage: Storage, prefix: str = "") -> list[str]:
    """Scene prefixes under ``prefix``: folders that directly hold image files (case-insensitive extensions)."""
    scenes = set()
    for key in storage.list(prefix):
        p = PurePosixPath(key)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith((".", "_")) for part in p.parts[:-1]):
            scenes.add(str(p.parent))
    return sorted(scenes)


def fetch_scene(storage: Storage, scene: str, local: str | Path) -> Path:
    """Download the files directly inside ``scene`` (not its subfolders) into folder ``local``."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    dests = {}
    for key in storage.list(scene.rstrip("/") + "/"):
        rel = key[len(scene.rstrip("/")) + 1 :]
        if "/" not in rel:
            dests[key] = safe_join(local, rel)  # every name checked before anything is written
    for key, dest in dests.items():
        storage.download(key, dest)
    return local


def cache_dir() -> Path:
    """Local cache folder for downloaded objects (``QUANTVGGT_CACHE`` or ``~/.cache/quantvggt``)."""
    return Path(os.environ.get("QUANTVGGT_CACHE", Path.home() / ".cache" / "quantvggt"))


def download_to_cache(uri: str) -> Path:
    """Download an object, or every object under a prefix, into the cache; return the local path.

    A cached copy is reused only when its recorded SHA-256 matches the stored object's.
    """
    bucket, key = parse_s3_uri(uri)
    st = S3Storage(f"s3://{bucket}")
    key = key.rstrip("/")
    keys = [k for k in st.list(key) if k == key or k.startswith(key + "/")]
    if not keys:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    root = safe_join(cache_dir() / "s3", bucket)
    dests = {k: safe_join(root, k) for k in keys}  # every key checked before anything is written
    for k in keys:
        dest = dests[k]
        stamp = dest.with_name(dest.name + ".sha256")
        head = retry(lambda k=k: st.client.head_object(Bucket=bucket, Key=k), f"head s3://{bucket}/{k}")
        want = head.get("Metadata", {}).get("sha256") or head.get("ETag", "").strip('"')
        if dest.is_file() and stamp.is_file() and stamp.read_text() == want:
            continue
        st.download(k, dest)
        stamp.write_text(want)
    return safe_join(root, key, allow_root=True)

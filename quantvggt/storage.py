"""One storage interface over local folders and ``s3://bucket/prefix`` (boto3; S3-compatible endpoints work).

Endpoint, region and credentials come from the standard AWS chain: ``AWS_ENDPOINT_URL`` (read by boto3 and the
aws CLI alike) points at MinIO, moto or another S3-compatible service; ``QUANTVGGT_S3_ENDPOINT`` is an older alias
that wins when set. Transient errors (connection problems, 5xx, throttling) are retried by botocore's own retry
modes (``standard`` unless ``AWS_RETRY_MODE`` says otherwise); every other botocore error becomes a one-line
:class:`StorageError` naming the object.

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
from quantvggt.scene import scene_source_key

log = logging.getLogger(__name__)
T = TypeVar("T")
COMPLETE = "_COMPLETE.json"


class StorageError(RuntimeError):
    """A storage operation failed after retries, or data failed verification."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The key does not exist (the bucket does)."""


class StorageUnavailableError(StorageError):
    """The endpoint could not be reached, or kept failing or throttling, through botocore's retries.

    The one storage failure that may pass later: callers that retry at a coarser level (a Prefect task) retry this
    and nothing else.
    """


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name")
    return bucket, key


STORAGE_ENV_PREFIXES = ("AWS_",)  # boto3's own configuration: endpoint, region, credentials, retry mode
STORAGE_ENV_NAMES = ("QUANTVGGT_S3_ENDPOINT",)
DEFAULT_MAX_ATTEMPTS = 5  # botocore's standard mode: ~15 s of jittered backoff before an endpoint counts as down


def s3_endpoint() -> str | None:
    """The S3 endpoint override: ``QUANTVGGT_S3_ENDPOINT`` (alias), else None so boto3 reads ``AWS_ENDPOINT_URL``."""
    return os.environ.get("QUANTVGGT_S3_ENDPOINT") or None


def s3_client() -> Any:
    """A boto3 S3 client: endpoint from ``AWS_ENDPOINT_URL`` (or the alias), botocore's standard retry mode."""
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):  # an explicit AWS_RETRY_MODE / AWS_MAX_ATTEMPTS is the user's choice
        retries["mode"] = "standard"
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
    return boto3.client("s3", endpoint_url=s3_endpoint(), config=Config(retries=retries))


def storage_env() -> dict[str, str]:
    """The environment variables that configure storage here (``AWS_*``, the endpoint alias), for other processes.

    Ray workers started before the user exported these (e.g. by ``infra/start-local.sh``) do not have them: pass
    this as a Ray ``runtime_env``'s ``env_vars``. On a real cluster prefer instance roles over exported keys, since
    a runtime_env is visible in Ray's job metadata.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV_NAMES}


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
_MISSING_KEY_CODES = ("404", "NoSuchKey", "NotFound")
_THROTTLING_CODES = ("Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "TooManyRequests")


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


def _location(what: str) -> str:
    # ``what`` reads "<verb> s3://bucket/key": errors name the object, as the CLI prints them on one line
    i = what.find("s3://")
    return what[i:] if i >= 0 else what


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def s3_call(fn: Callable[[], T], what: str) -> T:
    """Call ``fn`` (one boto3 operation) and turn every botocore error into a one-line :class:`StorageError`.

    botocore has already retried transient errors by then (see :func:`s3_client`), so nothing is retried here. A
    missing bucket, denied access or missing credentials say so; a missing key is :class:`ObjectNotFoundError` (also a
    ``FileNotFoundError``, as for local folders); an unreachable endpoint names the endpoint.
    """
    from boto3.exceptions import Boto3Error, S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = _location(what)
    try:
        return fn()
    except (ClientError, S3UploadFailedError) as e:
        ce = e if isinstance(e, ClientError) else e.__context__  # upload_file wraps the ClientError
        if not isinstance(ce, ClientError):
            raise StorageError(f"{what}: {_one_line(str(e))}") from e
        reason = s3_error_reason(ce)
        if reason is not None:
            raise StorageError(f"{where}: {reason}") from e
        err = ce.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in _MISSING_KEY_CODES:
            raise ObjectNotFoundError(f"{where}: no such object") from e
        status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        detail = _one_line(err.get("Message", "")) or code
        message = f"{what}: S3 error {code or status} (HTTP {status}): {detail}"
        if (isinstance(status, int) and (status >= 500 or status == 429)) or code in _THROTTLING_CODES:
            raise StorageUnavailableError(f"{message} (after botocore's retries)") from e
        raise StorageError(message) from e
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise StorageError(f"{where}: no usable AWS credentials found (check AWS credentials)") from e
    except (EndpointConnectionError, ConnectionError) as e:
        url = getattr(e, "kwargs", {}).get("endpoint_url") or s3_endpoint() or os.environ.get("AWS_ENDPOINT_URL", "")
        raise StorageUnavailableError(
            f"{what}: cannot reach the S3 endpoint {url or '(AWS default)'} after botocore's retries "
            f"(check AWS_ENDPOINT_URL): {_one_line(str(e))}"
        ) from e
    except (BotoCoreError, Boto3Error) as e:
        raise StorageError(f"{what}: {type(e).__name__}: {_one_line(str(e))}") from e


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
        key = f"{prefix.rstrip('/')}/{COMPLETE}"
        if not self.exists(key):
            return None
        return json.loads(self.read_bytes(key))

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
        for page in s3_call(
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)), f"list {self.uri(prefix)}"
        ):
            for obj in page.get("Contents", []):
                k = obj["Key"][len(self.base) + 1 :] if self.base else obj["Key"]
                if not k.startswith(".tmp/"):
                    out.append(k)
        return sorted(out)

    def exists(self, key: str) -> bool:
        try:
            s3_call(lambda: self.client.head_object(Bucket=self.bucket, Key=self._k(key)), f"head {self.uri(key)}")
            return True
        except ObjectNotFoundError:
            self._require_bucket(key)  # a HEAD 404 cannot tell a missing key from a missing bucket
            return False

    def _require_bucket(self, key: str) -> None:
        """Raise a one-line StorageError if the bucket is missing (checked once per instance)."""
        if getattr(self, "_bucket_ok", False):
            return
        try:
            s3_call(lambda: self.client.head_bucket(Bucket=self.bucket), f"head {self.uri(key)}")
        except ObjectNotFoundError as e:  # HEAD has no body: a missing bucket is a bare 404
            raise StorageError(f"{self.uri(key)}: bucket does not exist") from e
        self._bucket_ok = True

    def read_bytes(self, key: str) -> bytes:
        return s3_call(
            lambda: self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read(), f"get {self.uri(key)}"
        )

    def _commit(self, tmp_key: str, key: str) -> None:
        s3_call(
            lambda: self.client.copy_object(
                Bucket=self.bucket,
                Key=self._k(key),
                CopySource={"Bucket": self.bucket, "Key": tmp_key},
                MetadataDirective="COPY",
            ),
            f"commit {self.uri(key)}",
        )
        s3_call(
            lambda: self.client.delete_object(Bucket=self.bucket, Key=tmp_key), f"cleanup s3://{self.bucket}/{tmp_key}"
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        tmp_key = self._k(f".tmp/{uuid.uuid4().hex}")
        digest = hashlib.sha256(data).hexdigest()
        s3_call(
            lambda: self.client.put_object(Bucket=self.bucket, Key=tmp_key, Body=data, Metadata={"sha256": digest}),
            f"put {self.uri(key)}",
        )
        self._commit(tmp_key, key)

    def download(self, key: str, dest: str | Path, attempts: int = 3) -> Path:
        dest = Path(dest)
        for i in range(attempts):  # botocore retries the transfer; only our SHA-256 check is retried here
            try:
                with atomic_file(dest) as tmp:  # a failed or mismatching download never reaches dest
                    s3_call(  # streamed, multipart for large objects
                        lambda tmp=tmp: self.client.download_file(self.bucket, self._k(key), str(tmp)),
                        f"download {self.uri(key)}",
                    )
                    head = s3_call(
                        lambda: self.client.head_object(Bucket=self.bucket, Key=self._k(key)), f"head {self.uri(key)}"
                    )
                    want = head.get("Metadata", {}).get("sha256")
                    if want and sha256_file(tmp) != want:
                        raise ChecksumMismatch(f"{self.uri(key)}: SHA-256 mismatch after download")
                return dest
            except ChecksumMismatch:
                if i == attempts - 1:
                    raise
                log.warning("%s: SHA-256 mismatch after download; downloading again", self.uri(key))
        raise AssertionError("unreachable")

    def upload(self, src: str | Path, key: str) -> str:
        digest = sha256_file(src)
        tmp_key = self._k(f".tmp/{uuid.uuid4().hex}")
        s3_call(
            lambda: self.client.upload_file(str(src), self.bucket, tmp_key, ExtraArgs={"Metadata": {"sha256": digest}}),
            f"upload {self.uri(key)}",
        )
        self._commit(tmp_key, key)
        return digest

    def delete_prefix(self, prefix: str) -> None:
        for k in self.list(prefix):
            s3_call(lambda k=k: self.client.delete_object(Bucket=self.bucket, Key=self._k(k)), f"delete {self.uri(k)}")


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
        head = s3_call(lambda k=k: st.client.head_object(Bucket=bucket, Key=k), f"head s3://{bucket}/{k}")
        want = head.get("Metadata", {}).get("sha256") or head.get("ETag", "").strip('"')
        if dest.is_file() and stamp.is_file() and stamp.read_text() == want:
            continue
        st.download(k, dest)
        stamp.write_text(want)
    return safe_join(root, key, allow_root=True)

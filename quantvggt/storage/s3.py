"""``s3://bucket/prefix`` on S3 or any S3-compatible service (boto3).

Endpoint, region and credentials come from the standard AWS chain: ``AWS_ENDPOINT_URL`` (read by boto3 and the
aws CLI alike) points at MinIO, moto or another S3-compatible service; ``QUANTVGGT_S3_ENDPOINT`` is an older alias
that wins when set. Transient errors (connection problems, 5xx, throttling) are retried by botocore's own retry
modes (``standard`` unless ``AWS_RETRY_MODE`` says otherwise); every other botocore error becomes a one-line
:class:`StorageError` naming the object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from quantvggt.fsutil import atomic_file
from quantvggt.storage.base import (
    ChecksumMismatch,
    ObjectNotFoundError,
    Storage,
    StorageError,
    StorageUnavailableError,
    register_backend,
    sha256_file,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


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


_CLIENT_LOCK = threading.Lock()  # boto3's default session is not safe to make clients from in two threads at once
# objects at or under this size are read with one GET (its response carries the checksum metadata); larger ones with
# s3transfer's parallel ranged GETs (s3transfer's own multipart threshold)
SINGLE_GET_MAX_BYTES = 8 * 1024 * 1024


def s3_client() -> Any:
    """A boto3 S3 client: endpoint from ``AWS_ENDPOINT_URL`` (or the alias), botocore's standard retry mode."""
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):  # an explicit AWS_RETRY_MODE / AWS_MAX_ATTEMPTS is the user's choice
        retries["mode"] = "standard"
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
    with _CLIENT_LOCK:  # a worker with two scenes in flight opens storages from two threads
        return boto3.client("s3", endpoint_url=s3_endpoint(), config=Config(retries=retries))


SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
CREDENTIALS_ENV = "QUANTVGGT_RAY_CREDENTIALS"  # "forward" (default) or "node": workers use their nodes' own chain


def s3_env() -> dict[str, str]:
    """``AWS_*`` and the endpoint alias, as set in this process, for workers in other processes.

    With ``QUANTVGGT_RAY_CREDENTIALS=node`` the keys themselves stay here (a Ray ``runtime_env`` is visible in the
    cluster's job metadata): endpoint, region and profile travel, and each node's own credential chain (instance role,
    IRSA, its ~/.aws files) supplies the keys.
    """
    mode = os.environ.get(CREDENTIALS_ENV, "forward")
    if mode not in ("forward", "node"):
        raise ValueError(f"{CREDENTIALS_ENV} must be 'forward' or 'node', got {mode!r}")
    return {
        k: v
        for k, v in os.environ.items()
        if (k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV_NAMES) and not (mode == "node" and k in SECRET_NAMES)
    }


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
                if not k.startswith(".tmp/"):  # staging keys left by versions that wrote through .tmp/
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

    # One request per object written: an S3 PUT (and a multipart upload's completion) is atomic, so readers see the
    # old object or the whole new one; a result folder counts only once its completion record, written last, exists.
    def write_bytes(self, key: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        s3_call(
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=self._k(key), Body=data, Metadata={"sha256": digest}
            ),
            f"put {self.uri(key)}",
        )

    def download(self, key: str, dest: str | Path, attempts: int = 3) -> Path:
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        dest = Path(dest)
        for i in range(attempts):  # botocore retries the request; a broken stream or a bad checksum is retried here
            try:
                with atomic_file(dest) as tmp:  # a failed or mismatching download never reaches dest
                    want, got = self._get(key, tmp)
                    if want and got != want:
                        raise ChecksumMismatch(f"{self.uri(key)}: SHA-256 mismatch after download")
                return dest
            except (ChecksumMismatch, IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as e:
                if i == attempts - 1:
                    if isinstance(e, ChecksumMismatch):
                        raise
                    raise StorageUnavailableError(f"download {self.uri(key)}: {_one_line(str(e))}") from e
                log.warning("%s: %s; downloading again", self.uri(key), _one_line(str(e)))
        raise AssertionError("unreachable")

    def _get(self, key: str, tmp: Path) -> tuple[str | None, str]:
        """Write the object to ``tmp``: (its stored SHA-256 or None, the SHA-256 of the bytes written)."""
        what = f"download {self.uri(key)}"
        resp = s3_call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._k(key)), what)
        want = resp.get("Metadata", {}).get("sha256")
        if resp.get("ContentLength", 0) > SINGLE_GET_MAX_BYTES:  # a checkpoint: parallel ranged GETs, then hash
            resp["Body"].close()
            s3_call(lambda: self.client.download_file(self.bucket, self._k(key), str(tmp)), what)
            return want, sha256_file(tmp)
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            for chunk in resp["Body"].iter_chunks(1 << 20):
                f.write(chunk)
                h.update(chunk)
        return want, h.hexdigest()

    def upload(self, src: str | Path, key: str) -> str:
        digest = sha256_file(src)
        s3_call(  # multipart above s3transfer's threshold; the object appears whole when the upload completes
            lambda: self.client.upload_file(
                str(src), self.bucket, self._k(key), ExtraArgs={"Metadata": {"sha256": digest}}
            ),
            f"upload {self.uri(key)}",
        )
        return digest

    def delete_prefix(self, prefix: str) -> None:
        for k in self.list(prefix):
            s3_call(lambda k=k: self.client.delete_object(Bucket=self.bucket, Key=self._k(k)), f"delete {self.uri(k)}")

    def checksum(self, key: str) -> str:
        head = s3_call(lambda: self.client.head_object(Bucket=self.bucket, Key=self._k(key)), f"head {self.uri(key)}")
        return head.get("Metadata", {}).get("sha256") or head.get("ETag", "").strip('"')


register_backend("s3", S3Storage, s3_env)

"""Object storage access (``s3://bucket/key``) through boto3; endpoint and credentials from the AWS chain.

``QUANTVGGT_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``) points at S3-compatible services such as MinIO or moto.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name")
    return bucket, key


def s3_client() -> Any:
    """A boto3 S3 client honouring ``QUANTVGGT_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL`` and adaptive retries."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("QUANTVGGT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 8, "mode": "adaptive"}))


def cache_dir() -> Path:
    """Local cache folder for downloaded objects (``QUANTVGGT_CACHE`` or ``~/.cache/quantvggt``)."""
    return Path(os.environ.get("QUANTVGGT_CACHE", Path.home() / ".cache" / "quantvggt"))


def download_to_cache(uri: str) -> Path:
    """Download an object, or every object under a prefix, into the cache; return the local path.

    Files are fetched to a temporary name and renamed, so an interrupted download is never reused.
    """
    bucket, key = parse_s3_uri(uri)
    client = s3_client()
    root = cache_dir() / "s3" / bucket
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    prefix = key.rstrip("/")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            k = obj["Key"]
            if k == prefix or k.startswith(prefix + "/"):
                keys.append(k)
    if not keys:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    for k in keys:
        dest = root / k
        head = client.head_object(Bucket=bucket, Key=k)
        etag = head.get("ETag", "").strip('"')
        stamp = dest.with_name(dest.name + ".etag")
        if dest.is_file() and stamp.is_file() and stamp.read_text() == etag:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{hashlib.sha1(os.urandom(8)).hexdigest()[:8]}.part")
        log.info("downloading s3://%s/%s", bucket, k)
        client.download_file(bucket, k, str(tmp))
        tmp.replace(dest)
        stamp.write_text(etag)
    return root / prefix

"""Storage reliability: object keys never map outside their folder; S3 misconfiguration fails in one line, at once.

How to add a case:
- a hostile object key: append it to ``BAD_KEYS``; it must be refused by ``safe_join`` and, on moto, by every
  download path (``download_to_cache``, ``Storage.download_dir``, ``fetch_scene``) before anything is written;
- a key that must keep working: append it to ``GOOD_KEYS``;
- an S3 misconfiguration: add a ``(id, operation, expected message)`` row to ``S3_OPERATIONS`` (each runs against
  a missing bucket and against wrong credentials), or a new breakage fixture beside ``wrong_credentials``.
S3 tests run on moto (the session's ``s3_endpoint``; QUANTVGGT_TEST_S3_ENDPOINT: a real server, where the hostile-key
cases skip if the server refuses or normalises such keys); none of them may sleep, since only transient errors retry.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from quantvggt import storage as storage_mod
from quantvggt.storage import StorageError, download_to_cache, fetch_scene, open_storage, safe_join

BAD_KEYS = [
    "../escape.txt",
    "a/../../escape.txt",
    "ckpt/../../../../escape.txt",
    "..",
    "a/..",
    "/etc/passwd",
    "//etc/passwd",
    "\\..\\escape.txt",
    "a\\..\\..\\escape.txt",
    "a/\x00b",
    "",
    ".",
    "./",
]
GOOD_KEYS = ["a.png", "a/b/c.bin", "a//b", "./a", "..a/b", "a/...", "a/b..", "dir.with.dots/x"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_safe_join_refuses(key: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="object key .* refusing to map it under") as err:
        safe_join(tmp_path, key)
    assert repr(key) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_safe_join_keeps_ordinary_keys(key: str, tmp_path: Path) -> None:
    p = safe_join(tmp_path, key)
    assert p.resolve().is_relative_to(tmp_path.resolve()) and p.resolve() != tmp_path.resolve()


LOCAL_BAD_KEYS = [k for k in BAD_KEYS if not k.startswith("/") and k.strip("./")]  # see the test below


@pytest.mark.parametrize("key", LOCAL_BAD_KEYS, ids=repr)
def test_local_storage_refuses_keys_outside_its_root(key: str, tmp_path: Path) -> None:
    st = open_storage(tmp_path / "root")
    for op in (lambda: st.write_bytes(key, b"x"), lambda: st.read_bytes(key), lambda: st.exists(key)):
        with pytest.raises(StorageError, match="object key"):
            op()
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


def test_local_storage_keys_are_root_relative(tmp_path: Path) -> None:
    st = open_storage(tmp_path / "root")
    st.write_bytes("/etc/passwd", b"x")  # a leading '/' is insignificant, as for S3Storage and Storage.uri
    assert (tmp_path / "root" / "etc" / "passwd").read_bytes() == b"x"


def _bucket(s3_endpoint: str, keys: list[str]) -> str:
    name = f"rel-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=name)
    for k in keys:
        try:
            s3.put_object(Bucket=name, Key=k, Body=b"payload")
        except s3.exceptions.ClientError as e:  # e.g. SeaweedFS (QUANTVGGT_TEST_S3_ENDPOINT) refuses '..' keys
            pytest.skip(f"this S3 server does not store the key {k!r} ({e}): nothing hostile to download")
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])}
    if not set(keys) <= stored:  # and stores '/a/b' as 'a/b', 'a//b' as 'a/b'
        pytest.skip(f"this S3 server normalises the keys {sorted(set(keys) - stored)}: nothing hostile to download")
    return name


def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    sleeps: list[float] = []
    monkeypatch.setattr(storage_mod.base.time, "sleep", sleeps.append)
    return sleeps


@pytest.mark.parametrize("evil", ["ckpt/../../../../escape.txt", "ckpt/sub/../../../../../escape.txt"])
def test_download_to_cache_stays_in_the_cache(
    evil: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "a" / "cache"  # deep enough that an escape would still land inside tmp_path
    monkeypatch.setenv("QUANTVGGT_CACHE", str(cache))
    bucket = _bucket(s3_endpoint, ["ckpt/model.bin", evil])
    with pytest.raises(StorageError, match=r"object key '.*escape\.txt' has a '\.\.' component"):
        download_to_cache(f"s3://{bucket}/ckpt")
    assert not list(tmp_path.rglob("escape.txt*"))
    assert not list(tmp_path.rglob("model.bin*"))  # refused before anything was written


def test_download_to_cache_refuses_absolute_keys(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUANTVGGT_CACHE", str(tmp_path / "cache"))
    bucket = _bucket(s3_endpoint, [f"/{tmp_path.as_posix().strip('/')}/abs.txt"])
    with pytest.raises(StorageError, match="is absolute"):
        download_to_cache(f"s3://{bucket}/")
    assert not (tmp_path / "abs.txt").exists()


def test_fetch_scene_and_download_dir_stay_in_their_folder(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = _bucket(s3_endpoint, ["inbox/s1/a.png", "inbox/s1/..", "res/x/../../../escape.txt", "res/ok.txt"])
    st = open_storage(f"s3://{bucket}")
    with pytest.raises(StorageError, match=r"object key '\.\.' has a '\.\.' component"):
        fetch_scene(st, "inbox/s1", tmp_path / "deep" / "scene")
    with pytest.raises(StorageError, match="escape.txt' has a '..' component"):
        st.download_dir("res", tmp_path / "deep" / "res")
    assert not list(tmp_path.rglob("escape.txt*")) and not list(tmp_path.rglob("a.png*"))


# -- S3 misconfiguration: one line, no retries ----------------------------------------------------------------
S3_OPERATIONS: list[tuple[str, Callable, str]] = [
    ("list", lambda st, tmp: st.list("scenes/"), "scenes/"),
    ("exists", lambda st, tmp: st.exists("scenes/s1/_COMPLETE.json"), "scenes/s1/_COMPLETE.json"),
    ("read", lambda st, tmp: st.read_bytes("a.json"), "a.json"),
    ("write", lambda st, tmp: st.write_bytes("a.json", b"{}"), "a.json"),
    ("upload", lambda st, tmp: st.upload(tmp / "f.bin", "up/f.bin"), "up/f.bin"),
    ("download-to-cache", lambda st, tmp: download_to_cache(st.uri("ckpt")), "ckpt"),
]


@pytest.fixture
def wrong_credentials(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Moto checks signatures from now on; the session's access key 'test' exists in no IAM, as with a typo."""
    import os

    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    name = _bucket(s3_endpoint, ["ckpt/model.bin", "a.json"])
    if os.environ.get("QUANTVGGT_TEST_S3_ENDPOINT"):  # a real server checks signatures: a key it does not know
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"wrong-{uuid.uuid4().hex[:8]}")
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # the default session caches the credentials it found
        return name
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    return name


def _one_line_failure(op: Callable, bucket: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("QUANTVGGT_CACHE", str(tmp / "cache"))
    (tmp / "f.bin").write_bytes(b"data")
    sleeps = _no_sleep(monkeypatch)
    st = open_storage(f"s3://{bucket}/base")
    sent: list[str] = []
    st.client.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
    with pytest.raises(StorageError) as err:
        op(st, tmp)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert sleeps == [], "a permanent error was retried"
    assert len(sent) <= 2, f"a permanent error was retried by botocore: {sent}"  # exists: HEAD object + HEAD bucket
    return msg


@pytest.mark.parametrize("op_id,op,where", S3_OPERATIONS, ids=[r[0] for r in S3_OPERATIONS])
def test_missing_bucket_is_one_line(
    op_id: str, op: Callable, where: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    msg = _one_line_failure(op, bucket, tmp_path, monkeypatch)
    assert msg == f"s3://{bucket}/base/{where}: bucket does not exist"


@pytest.mark.parametrize("op_id,op,where", S3_OPERATIONS, ids=[r[0] for r in S3_OPERATIONS])
def test_wrong_credentials_are_one_line(
    op_id: str, op: Callable, where: str, wrong_credentials: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = _one_line_failure(op, wrong_credentials, tmp_path, monkeypatch)
    assert msg.startswith(f"s3://{wrong_credentials}/") and ": access denied (check AWS credentials)" in msg


def test_no_credentials_is_one_line(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # the default session caches the credentials it found
    msg = _one_line_failure(S3_OPERATIONS[0][1], "any-bucket", tmp_path, monkeypatch)
    assert msg == "s3://any-bucket/base/scenes/: no usable AWS credentials found (check AWS credentials)"


RETRY_TABLE = [  # (S3 error code, HTTP status, retried?): botocore's standard retry mode decides, not our code
    ("InternalError", 500, True),
    ("SlowDown", 503, True),
    ("Throttling", 400, True),
    ("TooManyRequests", 429, True),
    ("RequestTimeout", 400, True),
    ("NoSuchBucket", 404, False),
    ("AccessDenied", 403, False),
    ("InvalidAccessKeyId", 403, False),
    ("NoSuchKey", 404, False),
    ("InvalidArgument", 400, False),
]


class _Body:
    """The raw stream of an injected HTTP response."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **kwargs: object) -> object:
        yield self.data


@pytest.mark.parametrize("code,status,retried", RETRY_TABLE)
def test_only_transient_errors_are_retried(
    code: str, status: int, retried: bool, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.awsrequest import AWSResponse

    sleeps = _no_sleep(monkeypatch)
    st = open_storage(f"s3://{_bucket(s3_endpoint, ['k'])}")
    sent: list[int] = []

    def fail_twice(request: object, **kwargs: object) -> AWSResponse | None:
        sent.append(1)
        if len(sent) < 3:  # answered here, before reaching moto; None lets the request through
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, status, {}, _Body(body))
        return None

    st.client.meta.events.register("before-send.s3", fail_twice)
    if retried:
        assert st.read_bytes("k") == b"payload" and len(sent) == 3 and len(sleeps) == 2
    else:
        with pytest.raises(StorageError) as err:
            st.read_bytes("k")
        assert len(sent) == 1 and sleeps == [] and "\n" not in str(err.value)


def test_unreachable_endpoint_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_sleep(monkeypatch)
    monkeypatch.setenv("QUANTVGGT_S3_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError, match=r"^list s3://any-bucket/x: cannot reach the S3 endpoint http://127.0.0.1:9"):
        open_storage("s3://any-bucket").list("x")


def test_missing_key_is_file_not_found(s3_endpoint: str) -> None:
    st = open_storage(f"s3://{_bucket(s3_endpoint, [])}")
    with pytest.raises(FileNotFoundError, match="no such object"):
        st.read_bytes("nothing/here")

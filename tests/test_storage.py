"""Local and S3 (moto server on 127.0.0.1) storage behind one interface."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from quantvggt.storage import COMPLETE, StorageError, fetch_scene, find_scenes, open_storage


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_storage(tmp_path / "root")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"b{abs(hash(str(tmp_path))) % 10**8}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return open_storage(f"s3://{bucket}/base")


def test_bytes_files_and_listing(store, tmp_path: Path) -> None:
    store.write_bytes("a/b.txt", b"hello")
    assert store.read_bytes("a/b.txt") == b"hello" and store.exists("a/b.txt") and not store.exists("a/c.txt")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: multipart on S3
    digest = store.upload(big, "x/big.bin")
    back = store.download("x/big.bin", tmp_path / "dl" / "big.bin")
    assert back.read_bytes() == big.read_bytes() and len(digest) == 64
    assert store.list() == ["a/b.txt", "x/big.bin"]  # temporary keys are never listed
    store.delete_prefix("x/")
    assert store.list() == ["a/b.txt"]


def test_completion_record_written_last(store, tmp_path: Path) -> None:
    d = tmp_path / "res"
    (d / "sparse" / "0").mkdir(parents=True)
    (d / "sparse" / "0" / "cameras.bin").write_bytes(b"cam")
    (d / "report.json").write_text("{}")
    assert not store.is_complete("scene1")
    rec = store.upload_dir(d, "scene1", extra={"images": 3})
    assert store.is_complete("scene1") and rec["images"] == 3
    assert set(json.loads(store.read_bytes(f"scene1/{COMPLETE}"))["files"]) == {"sparse/0/cameras.bin", "report.json"}


def test_scene_discovery_and_fetch(store, tmp_path: Path) -> None:
    for k in (
        "inbox/s1/a.JPG",
        "inbox/s1/b.png",
        "inbox/s1/gt/depth.npy",
        "inbox/s2/c.webp",
        "inbox/_tmp/x.png",
        "inbox/readme.txt",
    ):
        store.write_bytes(k, b"data")
    assert find_scenes(store, "inbox/") == ["inbox/s1", "inbox/s2"]
    local = fetch_scene(store, "inbox/s1", tmp_path / "s1")
    assert sorted(p.name for p in local.iterdir()) == ["a.JPG", "b.png"]


def test_s3_checksum_mismatch_detected(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="corrupt")
    st = open_storage("s3://corrupt")
    f = tmp_path / "f.bin"
    f.write_bytes(b"original")
    st.upload(f, "f.bin")
    s3.put_object(Bucket="corrupt", Key="f.bin", Body=b"tampered", Metadata={"sha256": "0" * 64})
    monkeypatch.setattr("time.sleep", lambda s: None)
    with pytest.raises(StorageError, match="SHA-256 mismatch"):
        st.download("f.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_local_temporaries_are_never_listed(tmp_path: Path) -> None:
    from quantvggt.fsutil import atomic_file

    store = open_storage(tmp_path / "root")
    store.write_bytes("s/done.bin", b"x")
    with atomic_file(tmp_path / "root" / "s" / "half.bin") as tmp:  # a writer still busy (or killed) ...
        tmp.write_bytes(b"partial")
        assert tmp.name.startswith(".tmp-half.bin.")
        assert store.list() == ["s/done.bin"] and store.list("s/") == ["s/done.bin"]  # ... is invisible
    assert store.list() == ["s/done.bin", "s/half.bin"]
    assert not [p for p in (tmp_path / "root").rglob("*") if p.name.startswith(".tmp-")]


def test_s3_one_request_per_small_object(s3_endpoint: str, tmp_path: Path) -> None:
    """A write is one PUT, a read or download one GET (checksum from its headers), a missing record one GET: S3 bills
    per request, and each request is a round trip in a scene's wall time."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="counted")
    st = open_storage("s3://counted/base")
    sent: list[str] = []
    st.client.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 1000)
    st.write_bytes("a.txt", b"hello")
    st.upload(f, "f.bin")
    assert sent == ["PUT", "PUT"]
    sent.clear()
    st.download("f.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == f.read_bytes() and sent == ["GET"]
    sent.clear()
    assert st.completion_record("no-scene") is None and sent == ["GET"]


def test_s3_broken_stream_is_downloaded_again(s3_endpoint: str, tmp_path: Path) -> None:
    from botocore.exceptions import ResponseStreamingError

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="flaky")
    st = open_storage("s3://flaky")
    st.write_bytes("k.bin", b"payload" * 100)
    real, calls = st.client.get_object, []

    def get_object(**kw: object) -> dict:
        resp = real(**kw)
        calls.append(1)
        if len(calls) == 1:  # the connection drops after the headers

            class Broken:
                def iter_chunks(self, size: int):
                    yield b"pay"
                    raise ResponseStreamingError(error="connection reset")

            resp["Body"] = Broken()
        return resp

    st.client.get_object = get_object
    assert st.download("k.bin", tmp_path / "k.bin").read_bytes() == b"payload" * 100 and len(calls) == 2

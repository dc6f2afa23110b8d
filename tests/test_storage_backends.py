"""One storage test suite, every backend: a local folder, ``file://``, ``memory://`` and S3 (moto server) behave alike.

A new backend registers with ``quantvggt.storage.register_backend`` and is added to ``BACKENDS`` below.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from quantvggt.storage import (
    COMPLETE,
    ObjectNotFoundError,
    StorageError,
    download_to_cache,
    expand_scene_uris,
    fetch_scene,
    find_scenes,
    is_remote,
    local_path,
    open_storage,
    split_uri,
)


def _local(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return str(tmp_path / "store")


def _file(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return (tmp_path / "store").as_uri()


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return f"memory://{uuid.uuid4().hex}/store"


def _s3(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], str]] = {
    "local": _local,
    "file": _file,
    "memory": _memory,
    "s3": _s3,
}


@pytest.fixture(params=list(BACKENDS))
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("QUANTVGGT_CACHE", str(tmp_path / "cache"))
    return BACKENDS[request.param](tmp_path, request)


def test_objects_round_trip(root: str, tmp_path: Path) -> None:
    st = open_storage(root)
    assert st.list() == [] and not st.exists("a/b.bin")
    st.write_bytes("a/b.bin", b"hello")
    f = tmp_path / "up.bin"
    f.write_bytes(b"x" * 3000)
    digest = st.upload(f, "a/c/up.bin")
    assert st.list() == ["a/b.bin", "a/c/up.bin"] and st.list("a/c/") == ["a/c/up.bin"]
    assert st.read_bytes("a/b.bin") == b"hello" and st.exists("a/c/up.bin")
    assert st.checksum("a/c/up.bin") == digest
    assert st.download("a/c/up.bin", tmp_path / "down" / "x.bin").read_bytes() == b"x" * 3000
    assert st.uri("a/b.bin").endswith("store/a/b.bin")
    st.delete_prefix("a/c/")
    assert st.list() == ["a/b.bin"]


def test_missing_objects_are_file_not_found(root: str, tmp_path: Path) -> None:
    st = open_storage(root)
    st.write_bytes("present", b"1")
    with pytest.raises(FileNotFoundError):
        st.read_bytes("absent")
    with pytest.raises((FileNotFoundError, ObjectNotFoundError)):
        st.download("absent", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_result_folders_count_only_with_their_completion_record(root: str, tmp_path: Path) -> None:
    st = open_storage(root)
    folder = tmp_path / "res"
    (folder / "sparse" / "0").mkdir(parents=True)
    (folder / "sparse" / "0" / "cameras.bin").write_bytes(b"cams")
    (folder / "report.json").write_text("{}")
    assert not st.is_complete("scene1") and st.completion_record("scene1") is None
    record = st.upload_dir(folder, "scene1", extra={"source": "/data/scene1"})
    assert set(record["files"]) == {"sparse/0/cameras.bin", "report.json"}
    assert st.is_complete("scene1") and st.is_complete("scene1", source="/data/scene1")
    assert not st.is_complete("scene1", source="/elsewhere/scene1")
    assert json.loads(st.read_bytes(f"scene1/{COMPLETE}"))["source"] == "/data/scene1"
    back = st.download_dir("scene1", tmp_path / "back")
    assert (back / "sparse" / "0" / "cameras.bin").read_bytes() == b"cams"


def test_scenes_are_found_fetched_and_expanded(root: str, tmp_path: Path) -> None:
    st = open_storage(root)
    for key in ("inbox/s1/a.JPG", "inbox/s1/b.png", "inbox/s1/sub/c.png", "inbox/s2/x.jpg", "inbox/_out/y.png"):
        st.write_bytes(key, b"img")
    assert find_scenes(st, "inbox/") == ["inbox/s1", "inbox/s1/sub", "inbox/s2"]
    local = fetch_scene(st, "inbox/s1", tmp_path / "fetched")
    assert sorted(p.name for p in local.iterdir()) == ["a.JPG", "b.png"]  # the scene's own files, not subfolders
    uris = expand_scene_uris([st.uri("inbox")])
    assert [u.rsplit("/", 2)[-2:] for u in uris] == [["inbox", "s1"], ["s1", "sub"], ["inbox", "s2"]]
    parent, name = split_uri(st.uri("inbox/s1"))
    assert name == "s1" and parent.list("s1/") == ["s1/a.JPG", "s1/b.png", "s1/sub/c.png"]


def test_download_to_cache_is_reused_and_stays_inside(root: str, tmp_path: Path) -> None:
    st = open_storage(root)
    st.write_bytes("ckpt/model.bin", b"weights")
    st.write_bytes("ckpt/quant.json", b"{}")
    if not is_remote(root):
        return  # local folders are read in place
    local = download_to_cache(st.uri("ckpt"))
    assert (local / "model.bin").read_bytes() == b"weights"
    assert str(local).startswith(str(tmp_path / "cache"))
    st.write_bytes("ckpt/model.bin", b"weights-2")  # a changed object is downloaded again
    assert (download_to_cache(st.uri("ckpt")) / "model.bin").read_bytes() == b"weights-2"
    with pytest.raises(FileNotFoundError, match="no such object or prefix"):
        download_to_cache(st.uri("nothing"))


def test_keys_that_leave_the_folder_are_refused(root: str, tmp_path: Path) -> None:
    st = open_storage(root)
    evil = "s/../../../escape.png"
    if not is_remote(root):
        with pytest.raises(StorageError, match="'..' component"):
            st.write_bytes(evil, b"1")  # a local key is a path: it must stay in the folder
        return
    st.write_bytes("s/ok.png", b"1")
    try:
        st.write_bytes(evil, b"1")  # AWS S3 and moto hold any key; mapping it to a local path must refuse
    except StorageError as e:  # some S3-compatible servers (SeaweedFS) refuse such a key: nothing to map then
        assert "InvalidRequest" in str(e), e
        st.download_dir("s", tmp_path / "a" / "b" / "c")
    else:
        with pytest.raises(StorageError, match="'..' component"):
            st.download_dir("s", tmp_path / "a" / "b" / "c")
    assert not list(tmp_path.rglob("escape.png"))


def test_schemes_pick_the_backend() -> None:
    assert type(open_storage("memory://x/y")).__name__ == "MemoryStorage"
    assert type(open_storage("file:///tmp")).__name__ == "LocalStorage"
    assert local_path("file:///tmp/a") == Path("/tmp/a") and local_path("s3://b/k") is None
    with pytest.raises(ValueError, match=r"no storage backend for gs://"):
        open_storage("gs://bucket/x")


def test_empty_key_parts_and_hidden_folders_are_handled_and_said(root: str, tmp_path: Path, caplog) -> None:
    import logging

    st = open_storage(root)
    if not is_remote(root):
        return  # a local path has no empty parts
    for key in ("inbox/s1//a.png", "inbox/s1/b.png", "inbox/s1//b.png", "inbox/_out/s1/images/c.png"):
        st.write_bytes(key, b"img")
    with caplog.at_level(logging.INFO, logger="quantvggt.storage.base"):
        assert find_scenes(st, "inbox/") == ["inbox/s1"]
    assert "left out 1 image folders" in caplog.text and "inbox/_out/s1/images" in caplog.text
    local = fetch_scene(st, "inbox/s1", tmp_path / "s1")
    assert sorted(p.name for p in local.iterdir()) == ["a.png", "b.png"]


def test_keys_stay_out_of_ray_metadata_when_nodes_have_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantvggt.storage import storage_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.local:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    assert storage_env()["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"  # default: forwarded (a Ray head started before them)
    monkeypatch.setenv("QUANTVGGT_RAY_CREDENTIALS", "node")
    env = storage_env()
    assert env["AWS_ENDPOINT_URL"] == "http://s3.local:9000" and "AWS_SECRET_ACCESS_KEY" not in env

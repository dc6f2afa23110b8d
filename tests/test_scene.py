"""Scene results (manifest rows) and the one scene URI -> output name mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pytest

from quantvggt.manifest import markdown_table, read_manifest, write_manifest
from quantvggt.scene import SceneResult, arrow_type, manifest_schema, scene_name
from quantvggt.storage import open_storage


def _result(**kw: object) -> SceneResult:
    base = dict(
        scene="scene_a",
        status="done",
        images=7,
        points=1234,
        seconds=2.5,
        worker="host:1",
        attempt=2,
        error="",
        output="s3://b/out/scene_a",
        report="s3://b/out/scene_a/report.json",
        source="s3://b/inbox/scene_a",
    )
    return SceneResult(**{**base, **kw})


def test_row_round_trip() -> None:
    r = _result()
    row = r.to_row()
    assert list(row) == [f.name for f in dataclasses.fields(SceneResult)]
    assert SceneResult.from_row(row) == r
    # older manifests lack newer columns and may hold nulls: defaults fill them; unknown columns are ignored
    old = SceneResult.from_row({"scene": "x", "status": "skipped", "error": None, "extra": 1})
    assert (old.scene, old.status, old.error, old.report, old.source) == ("x", "skipped", "", "", "")
    with pytest.raises(ValueError, match="no scene name"):
        SceneResult.from_row({"status": "done"})
    with pytest.raises(ValueError, match="status must be one of done, skipped, failed"):
        _result(status="finished")


def test_manifest_schema_is_derived_from_the_fields() -> None:
    schema = manifest_schema()
    assert schema.names == [f.name for f in dataclasses.fields(SceneResult)]
    assert schema.field("status").type == pa.string() and schema.field("images").type == pa.int64()
    assert schema.field("seconds").type == pa.float64() and schema.field("report").type == pa.string()
    assert arrow_type(Literal["a", "b"]) == pa.string() and arrow_type(int | None) == pa.int64()
    assert arrow_type(bool) == pa.bool_()
    with pytest.raises(TypeError, match="no Parquet column type"):
        arrow_type(list[int])


def test_manifest_written_and_read_back(tmp_path: Path) -> None:
    store = open_storage(tmp_path)
    results = [_result(), _result(scene="scene_b", status="failed", error="SceneError: b | c", points=0)]
    uri = write_manifest(results, store, "_manifests/run.parquet")
    assert uri == str(tmp_path / "_manifests" / "run.parquet")
    assert read_manifest(store, "_manifests/run.parquet") == results
    table = markdown_table(results)
    assert "| scene_a | done | 7 | 1234 | 2.5 | host:1 |  |" in table and "SceneError: b / c" in table


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("s3://bucket/inbox/scene_a", "scene_a"),
        ("s3://bucket/inbox/scene_a/", "scene_a"),
        ("s3://bucket/inbox//scene_a//", "scene_a"),
        ("s3://bucket/inbox/./x/../scene_b", "scene_b"),
        ("/data/scenes/scene_c/", "scene_c"),
        ("relative/scene_d", "scene_d"),
        ("file:///data/scene_e", "scene_e"),
    ],
)
def test_scene_name(given: str, name: str) -> None:
    assert scene_name(given) == name


def test_scene_name_of_dot_paths_is_the_real_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = tmp_path / "outer" / "scene_f"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert scene_name(".") == scene_name("./") == "scene_f"
    assert scene_name("..") == scene_name(Path("..")) == "outer"
    assert scene_name("../scene_f/.") == "scene_f"


@pytest.mark.parametrize("given", ["", "   ", "/", "s3://bucket", "s3://bucket/", "s3://bucket/a/.."])
def test_scene_name_without_a_usable_name(given: str) -> None:
    with pytest.raises(ValueError, match="scene"):
        scene_name(given)


def test_output_names_refuse_or_resolve_collisions(tmp_path) -> None:
    from quantvggt.scene import output_names

    a, b = str(tmp_path / "in" / "scene_000"), str(tmp_path / "other" / "scene_000")
    c = str(tmp_path / "in" / "scene_001")
    with pytest.raises(ValueError, match="would all write the output folder 'scene_000'"):
        output_names([a, b, c])
    names = output_names([a, b, c], on_collision="suffix")
    assert names[c] == "scene_001" and len({names[a], names[b]}) == 2
    assert names == output_names([c, b, a], on_collision="suffix")  # order does not matter
    assert output_names(["s3://x/in/scene_000", "s3://x/in/scene_000/"]) == {
        "s3://x/in/scene_000": "scene_000",
        "s3://x/in/scene_000/": "scene_000",
    }  # same source twice is fine
    with pytest.raises(ValueError, match="would all write"):
        output_names(["s3://x/a/scene_000", "s3://x/b/scene_000"])

"""Parameter checks fail fast in one line; what a run shows keeps the full error, without terminal codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.params import (
    ParameterError,
    check_deploy_env,
    check_inbox,
    check_scene_inputs,
    check_storage_root,
    record_latest,
    require,
    resolve_checkpoint,
)
from flows.report import browse_url, one_line, plain, scene_rows, summary_markdown
from quantvggt.scene import SceneResult


@pytest.mark.parametrize("value", ["", "  ", None, [], [""]])
def test_empty_parameters_fail_naming_the_parameter(value: object) -> None:
    with pytest.raises(ParameterError, match="parameter 'checkpoint' is empty") as err:
        require(checkpoint=value)
    assert "\n" not in str(err.value) and "QUANTVGGT_STORE" in str(err.value)


def test_deploy_env_must_be_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QUANTVGGT_STORE", raising=False)
    monkeypatch.setenv("QUANTVGGT_REPO", "")
    with pytest.raises(ParameterError, match=r"set QUANTVGGT_STORE, QUANTVGGT_REPO before `prefect deploy`"):
        check_deploy_env()
    monkeypatch.setenv("QUANTVGGT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTVGGT_REPO", str(tmp_path))
    with pytest.raises(ParameterError, match="not this repository"):
        check_deploy_env()
    monkeypatch.setenv("QUANTVGGT_REPO", str(Path(__file__).resolve().parents[2]))
    assert check_deploy_env()["store"] == str(tmp_path / "store")


def test_s3_roots_need_their_bucket(s3_endpoint: str) -> None:
    from quantvggt.storage import StorageError

    with pytest.raises(StorageError, match="^s3://no-such-bucket-x/out/.quantvggt-probe: bucket does not exist$"):
        check_storage_root("s3://no-such-bucket-x/out")
    with pytest.raises(StorageError, match="bucket does not exist"):
        check_inbox("s3://no-such-bucket-x/inbox")
    with pytest.raises(ParameterError, match="relative path"):
        check_storage_root("out/here")


def test_inbox_and_scene_inputs_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="no such folder"):
        check_inbox("/inbox")  # what an unset QUANTVGGT_STORE used to template
    with pytest.raises(ParameterError, match="no such folder"):
        check_scene_inputs([str(tmp_path / "missing")])
    check_scene_inputs([str(tmp_path)])


def test_latest_checkpoint_is_resolved_or_explained(tmp_path: Path) -> None:
    store = tmp_path / "store" / "quantized"
    with pytest.raises(ParameterError, match="no quantized checkpoint stored under .* run the quantize flow first"):
        resolve_checkpoint(f"{store}/latest")
    ckpt = store / "abc123"
    ckpt.mkdir(parents=True)
    (ckpt / "quant.json").write_text("{}")
    record_latest(str(store), str(ckpt), {"recipe": "r"})
    assert json.loads((store / "latest.json").read_text())["recipe"] == "r"
    assert resolve_checkpoint(f"{store}/latest") == str(ckpt)
    assert resolve_checkpoint(str(ckpt)) == str(ckpt)
    assert resolve_checkpoint("vggt-tiny-synthetic") == "vggt-tiny-synthetic"  # names pass as they are
    with pytest.raises(ParameterError, match="no such file or folder"):
        resolve_checkpoint(str(tmp_path / "nothing"))


def test_summary_keeps_the_full_error_without_terminal_codes() -> None:
    long_error = "SceneError: " + "x" * 300 + "\nsecond | line"
    ansi = "\x1b[36m(ReconstructionWorker pid=1)\x1b[0m boom"
    results = [
        SceneResult("a", "done", images=3, points=10, seconds=1.25, output="/out/a"),
        SceneResult("b", error=long_error, source="s3://x/b"),
        SceneResult("c", error=ansi),
    ]
    md = summary_markdown("Run", results, "/out/_manifests/r.parquet", {"a": b"\x89PNG"})
    assert "x" * 300 in md and "second \\| line" in md and "<br>" in md
    assert "\x1b" not in md and "(ReconstructionWorker pid=1) boom" in md
    assert "**2 failed**, 1 done, 0 already complete of 3 scenes" in md
    assert "data:image/png;base64," in md and "(file:///out/a)" in md
    rows = scene_rows(results)
    assert rows[1]["error"] == long_error and rows[0]["preview"] == "/out/a/preview.png" and rows[1]["preview"] == ""
    assert plain(ansi) == "(ReconstructionWorker pid=1) boom"


def test_one_line_and_links(monkeypatch: pytest.MonkeyPatch) -> None:
    tb = "Traceback (most recent call last):\n  File 'x', line 1\nValueError: bad"
    assert one_line(tb) == "ValueError: bad (+2 lines)"
    assert one_line("first\nsecond", 12) == "first (+1..."
    monkeypatch.delenv("QUANTVGGT_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000/")
    assert browse_url("s3://bkt/a b/c") == "http://127.0.0.1:5000/bkt/a%20b/c"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert browse_url("s3://bkt/k").startswith("https://s3.console.aws.amazon.com/s3/buckets/bkt?prefix=k")

"""Third pass (#26), the command-line and scene-path items: one line, before any work, nothing lost."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from quantvggt import cli, synth
from quantvggt.options import ReconstructionOptions
from quantvggt.quant.load import load_model
from quantvggt.reconstruct import SceneJob, process_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = synth.main(tmp_path_factory.mktemp("refusals") / "data", scenes=1, frames=3, seed=0, size=(112, 84))
    return root / "scene_000"


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_empty_out_is_refused(scene: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = _one_line(capsys, ["reconstruct", str(scene), "--out", "", "--model", "demo-random"])
    assert "empty path" in err and list(tmp_path.iterdir()) == []


def test_quantized_given_a_float_model_is_refused(scene: Path, tmp_path: Path, capsys) -> None:
    err = _one_line(
        capsys, ["reconstruct", str(scene), "--out", str(tmp_path / "o"), "--quantized", "vggt-tiny-synthetic"]
    )
    assert "not a quantized checkpoint" in err and not (tmp_path / "o").exists()


def test_ignored_chunk_options_are_refused(scene: Path, tmp_path: Path, capsys) -> None:
    base = ["reconstruct", str(scene), "--out", str(tmp_path / "o"), "--model", "demo-random"]
    assert "overlap applies to sequential" in _one_line(capsys, [*base, "--chunking", "anchors", "--overlap", "2"])
    assert "anchors applies to chunking" in _one_line(capsys, [*base, "--anchors", "2"])


def test_a_folder_that_is_not_our_result_is_never_replaced(scene: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / scene.name).mkdir(parents=True)
    (out / scene.name / "thesis.tex").write_text("years of work")
    res = process_scene(load_model("demo-random"), SceneJob(str(scene), str(out), force=True))
    assert res.status == "failed" and "is not a quantvggt result" in res.error
    assert (out / scene.name / "thesis.tex").read_text() == "years of work"


def test_our_own_result_is_replaced_and_skipped(scene: Path, tmp_path: Path) -> None:
    model, out = load_model("vggt-tiny-synthetic"), tmp_path / "out"
    job = SceneJob(str(scene), str(out), options=ReconstructionOptions(max_points=50))
    assert process_scene(model, job).status == "done"
    record = json.loads((out / scene.name / "_COMPLETE.json").read_text())
    assert record["source"] and "sparse/0/cameras.bin" in record["files"] and "preview.png" in record["files"]
    assert process_scene(model, job).status == "skipped"
    job.force = True
    assert process_scene(model, job).status == "done"


def test_a_memory_error_fails_that_scene_only(scene: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    other = tmp_path / "other" / "scene_b"
    shutil.copytree(scene, other)
    import quantvggt.reconstruct as rec

    real = rec.plan_scene

    def oom_for_b(model, job, folder):  # type: ignore[no-untyped-def]
        if job.name == "scene_b":
            raise MemoryError("cannot allocate 8.5 GB")
        return real(model, job, folder)

    monkeypatch.setattr(rec, "plan_scene", oom_for_b)
    model = ["--model", "vggt-tiny-synthetic", "--max-points", "50"]
    rc = cli.main(["reconstruct", str(scene), str(other), "--out", str(tmp_path / "o"), *model])
    out = capsys.readouterr().out
    assert rc == 1 and "scene_b: FAILED: MemoryError: cannot allocate 8.5 GB" in out and "1 of 2 scenes" in out
    assert (tmp_path / "o" / scene.name / "sparse" / "0" / "points3D.bin").is_file()


@pytest.mark.parametrize(("argv", "message"), [(["--scenes", "0"], "--scenes must be >= 1"),
                                               (["--model", "bogus"], "bogus: not a file, folder")])  # fmt: skip
def test_demo_refuses_bad_arguments_in_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    err = _one_line(capsys, ["demo", "--out", str(tmp_path / "d"), *argv])
    assert message in err and not (tmp_path / "d").exists()


def test_the_offline_error_names_the_offline_model() -> None:
    import inspect

    from quantvggt.model import loading

    assert "--model vggt-tiny-synthetic" in inspect.getsource(loading._download_hub)


def test_a_nightly_run_whose_out_is_inside_its_inbox_never_takes_its_outputs_for_scenes(
    scene: Path, tmp_path: Path
) -> None:
    from flows.reconstruct import ScenesFailedError, reconstruct_nightly
    from quantvggt.manifest import read_manifest
    from quantvggt.storage import open_storage

    inbox = tmp_path / "inbox"
    shutil.copytree(scene, inbox / "scene_a")
    shutil.copytree(scene, inbox / "results" / "scene_a" / "images")  # last night's result, its images/ beside it
    with pytest.raises(ScenesFailedError) as err:  # a checkpoint that is not there: every scene fails, none runs
        reconstruct_nightly(str(inbox), str(tmp_path / "no-such-checkpoint"), str(inbox / "results"))
    manifest = Path(err.value.manifest)
    rows = read_manifest(open_storage(manifest.parent), manifest.name)
    assert [r.source for r in rows] == [str(inbox / "scene_a")], [r.source for r in rows]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--conf-threshold", "1e9"], r"no 3D point is left: conf_threshold 1000000000.0 is above every confidence"),
        (["--min-track-length", "50"], r"no 3D point is left: min_track_length 50 drops every track"),
    ],
)
def test_options_that_empty_the_model_fail_the_scene_naming_the_option(
    option: list[str], message: str, scene: Path, tmp_path: Path, capsys
) -> None:
    argv = ["reconstruct", str(scene), "--out", str(tmp_path / "o"), "--model", "vggt-tiny-synthetic", *option]
    assert cli.main(argv) == 1
    assert re.search(message, capsys.readouterr().out)
    assert not (tmp_path / "o" / scene.name).exists()  # no 0-point model written as if it were a result


def test_an_unknown_export_format_is_refused_before_the_model_loads(scene: Path, tmp_path: Path, capsys) -> None:
    argv = ["reconstruct", str(scene), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")]
    err = _one_line(capsys, [*argv, "--export", "mesh"])
    assert "unknown export format(s) mesh (known: colmap" in err and "no-model" not in err

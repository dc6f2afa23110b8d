"""Where results are written: never over a scene's own images, never two scenes into one folder, never a
traceback or a silently truncated model when the output location is unusable.

How to add a case:
- how a scene path names its output: add ``(id, working folder, scene argument, name)`` to ``NAMES``;
- a command line that must be refused before any work: add ``(id, make(root) -> argv, regex)`` to ``REFUSED``
  (it runs with a model that does not exist, so a refusal that came after loading would fail differently);
- an unusable output location: add ``(id, break_it(root, out, monkeypatch), regex)`` to ``BROKEN``; it must fail
  that scene in one line naming the place, leave any previous result complete, and leave no hidden leftovers.
Scenes are 3 synthetic frames of 56x42; the model is the shipped ``vggt-tiny-synthetic`` (about a second a scene).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantvggt import synth
from quantvggt.fsutil import check_outputs_outside_inputs
from quantvggt.quant.load import load_model
from quantvggt.reconstruct import ReconstructionOptions, SceneJob, main, process_scene
from quantvggt.scene import scene_name

MODEL = "vggt-tiny-synthetic"
OPTS = ReconstructionOptions(max_points=200)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic scenes to copy from."""
    return synth.main(tmp_path_factory.mktemp("src"), scenes=2, frames=3, seed=0, size=(56, 42))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The shipped tiny model."""
    return load_model(MODEL, "cpu")


@pytest.fixture
def root(tmp_path: Path, scenes: Path) -> Path:
    """``data/scene_000``, ``data/scene_001`` (copies: a test may damage them) under a fresh folder."""
    for s in ("scene_000", "scene_001"):
        shutil.copytree(scenes / s, tmp_path / "data" / s)
    return tmp_path


def frames(folder: Path) -> list[str]:
    """The PNG frames of a scene folder."""
    return sorted(p.name for p in folder.glob("*.png"))


def hidden(folder: Path) -> list[str]:
    """Hidden entries (temporary folders, locks) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


# -- 1. '.' and '..' name the output after the folder they mean -------------------------------------------------------
NAMES = [
    ("dot", "data/scene_000", ".", "scene_000"),
    ("dot-slash", "data/scene_000", "./", "scene_000"),
    ("dotdot", "data/scene_000/sub", "..", "scene_000"),
    ("ends-in-dotdot", "data", "scene_000/sub/..", "scene_000"),
    ("dot-inside", "data", "scene_000/./", "scene_000"),
    ("dotdot-then-name", "data/scene_001", "../scene_000", "scene_000"),
]


@pytest.mark.parametrize(("cwd", "arg", "name"), [n[1:] for n in NAMES], ids=[n[0] for n in NAMES])
def test_scene_name_of_relative_paths(
    cwd: str, arg: str, name: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "data" / "scene_000" / "sub").mkdir()
    monkeypatch.chdir(root / cwd)
    assert scene_name(arg) == name


def test_filesystem_root_has_no_name() -> None:
    with pytest.raises(ValueError, match="filesystem root is not a scene folder"):
        scene_name("/")


@pytest.mark.parametrize(("cwd", "arg", "out"), [("scene_000", ".", "../out"), ("scene_000/sub", "..", "../../out")])
def test_reconstructing_dot_writes_only_its_own_folder(
    cwd: str, arg: str, out: str, root: Path, run_cli: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cd scene_002 && quantvggt reconstruct . --out ../out` once replaced the whole ../out folder
    data = root / "data"
    (data / "scene_000" / "sub").mkdir()
    (data / "out" / "scene_001").mkdir(parents=True)
    (data / "out" / "keep.txt").write_text("another run's file")
    (data / "out" / "scene_001" / "report.json").write_text("{}")
    monkeypatch.chdir(data / cwd)
    rc, stdout, err = run_cli("reconstruct", arg, "--out", out, "--model", MODEL, "--max-points", "100")
    assert rc == 0, stdout + err
    assert sorted(p.name for p in (data / "out").iterdir()) == ["keep.txt", "scene_000", "scene_001"]
    assert (data / "out" / "scene_000" / "sparse" / "0" / "points3D.bin").is_file()
    assert (data / "out" / "keep.txt").read_text() == "another run's file"
    assert frames(data / "scene_000") == ["frame_000.png", "frame_001.png", "frame_002.png"]


# -- 2, 3, 7. refused before any work ---------------------------------------------------------------------------------
def _collision(root: Path) -> list[str | Path]:
    shutil.copytree(root / "data" / "scene_000", root / "other" / "scene_000")
    return ["reconstruct", root / "data" / "scene_000", root / "other" / "scene_000", "--out", root / "out"]


def _symlinked_out(root: Path) -> list[str | Path]:
    (root / "link").symlink_to(root / "data")
    return ["reconstruct", root / "data" / "scene_000", "--out", root / "link"]


def _contains(root: Path) -> list[str | Path]:
    inner = root / "data" / "inner" / "inner"
    shutil.copytree(root / "data" / "scene_000", inner)
    return ["reconstruct", inner, "--out", root / "data"]  # OUT/inner would contain the scene


def _opt(*option: str) -> Callable[[Path], list[str | Path]]:
    return lambda r: ["reconstruct", r / "data" / "scene_000", "--out", r / "o", *option]


REFUSED: list[tuple[str, Callable[[Path], list[str | Path]], str]] = [
    # 2. output roots may not overlap inputs (`--out sb3` for sb3/scene_000 deleted the frames)
    (
        "out-is-the-scenes-parent",
        lambda r: ["reconstruct", r / "data" / "scene_000", "--out", r / "data"],
        r"output .*data/scene_000 is the input folder .*data/scene_000",
    ),
    (
        "out-inside-the-scene",
        lambda r: ["reconstruct", r / "data" / "scene_000", "--out", r / "data" / "scene_000" / "out"],
        "lies inside the input folder",
    ),
    ("out-contains-the-scene", _contains, "contains the input folder"),
    ("out-through-a-symlink", _symlinked_out, "is the input folder"),
    (
        "another-scenes-output-over-this-one",
        lambda r: ["reconstruct", r / "data" / "scene_000", r / "data", "--out", r],  # OUT/data holds scene_000
        "contains the input folder .*data/scene_000",
    ),
    # 3. two scenes with one folder name
    ("same-folder-name", _collision, r"scenes .*data/scene_000, .*other/scene_000 would all write .*'scene_000'"),
    # 7. bad numbers and URIs
    ("conf-threshold-nan", _opt("--conf-threshold", "nan"), "conf_threshold must be a finite number, got nan"),
    ("conf-threshold-inf", _opt("--conf-threshold", "inf"), "conf_threshold must be a finite number, got inf"),
    ("max-points-negative", _opt("--max-points", "-1"), "max_points must be >= 1, got -1"),
    ("conf-percentile-nan", _opt("--conf-percentile", "nan"), "conf_percentile must be a finite number"),
    ("align-residual-nan", _opt("--max-align-residual", "nan"), "max_align_residual must be a finite number > 0"),
    ("memory-budget-inf", _opt("--memory-budget-mb", "inf"), "memory_budget_mb must be a finite number"),
    # storage URIs are read and written through the storage backends (s3://, file://, memory://); others are refused
    (
        "scene-on-unknown-storage",
        lambda r: ["reconstruct", "gs://bucket/inbox/scene_000/", "--out", r / "o"],
        r"^quantvggt reconstruct: error: gs://bucket/inbox/scene_000/: no storage backend for gs://",
    ),
    (
        "out-on-unknown-storage",
        lambda r: ["reconstruct", r / "data" / "scene_000", "--out", "gs://bucket/out"],
        "gs://bucket/out: no storage backend for gs://",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_before_any_work(make: Callable, expect: str, root: Path, run_cli: Callable) -> None:
    argv = make(root)
    before = {p: p.read_bytes() for p in root.rglob("*.png")}
    rc, stdout, err = run_cli(*argv, "--model", str(root / "no-such-model"))
    assert rc == 2, stdout + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("quantvggt reconstruct: error: "), err
    assert re.search(expect, err), err
    assert "no-such-model" not in err  # refused before the model was looked for
    assert {p: p.read_bytes() for p in root.rglob("*.png")} == before  # every frame untouched
    assert not (root / "out").exists() and not (root / "o").exists()


def test_same_folder_names_with_suffix_are_both_kept(root: Path, run_cli: Callable) -> None:
    # the CLI once said "2 of 2 reconstructed" while the second overwrote the first
    argv = _collision(root)
    rc, stdout, err = run_cli(*argv, "--on-collision", "suffix", "--model", MODEL, "--max-points", "50")
    assert rc == 0, stdout + err
    outs = sorted(p.name for p in (root / "out").iterdir())
    assert len(outs) == 2 and all(re.fullmatch(r"scene_000-[0-9a-f]{8}", o) for o in outs), outs
    assert "2 of 2 scenes reconstructed" in stdout
    assert all((root / "out" / o / "sparse" / "0" / "points3D.bin").is_file() for o in outs)


def test_library_refuses_overlap_too(root: Path, model: torch.nn.Module) -> None:
    scene = root / "data" / "scene_000"
    with pytest.raises(ValueError, match="is the input folder"):
        main(model, scene, root / "data", OPTS)
    with pytest.raises(ValueError, match="is the input folder"):
        check_outputs_outside_inputs(["s3://b/in/scene_000"], ["s3://b/in/./x/../scene_000/"])
    check_outputs_outside_inputs(["s3://b/in/scene_0001"], ["s3://b/in/scene_000"])  # a prefix, not a parent
    check_outputs_outside_inputs(["s3://other/in/scene_000"], ["s3://b/in/scene_000"])
    # the batch path: a failed scene (even with force, which deletes OUT/<name> first), frames untouched
    res = process_scene(model, SceneJob(str(scene), str(root / "data"), options=OPTS, force=True))
    assert res.status == "failed" and "is the input folder" in res.error
    assert frames(scene) == ["frame_000.png", "frame_001.png", "frame_002.png"]


# -- 5. unusable output locations: one line per scene, the batch goes on ---------------------------------------------
def _out_is_a_file(out: Path, mp: pytest.MonkeyPatch) -> Path:
    shutil.rmtree(out)
    out.write_text("not a folder")
    return out


def _out_below_a_file(out: Path, mp: pytest.MonkeyPatch) -> Path:
    return _out_is_a_file(out, mp) / "sub"


def _scene_output_is_a_file(out: Path, mp: pytest.MonkeyPatch) -> Path:
    shutil.rmtree(out / "scene_000")
    (out / "scene_000").write_text("not a folder")
    return out


def _read_only(out: Path, mp: pytest.MonkeyPatch) -> Path:
    out.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permissions: make creating the temporary folder fail as it would
        real = tempfile.mkdtemp

        def mkdtemp(*a: object, dir: str | Path | None = None, **k: object) -> str:
            if dir is not None and Path(dir) == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)  # type: ignore[call-overload]

        mp.setattr("quantvggt.fsutil.tempfile.mkdtemp", mkdtemp)
    return out


def _full_disk(after: Callable[[Path], None], writer: str = "write") -> Callable[[Path, pytest.MonkeyPatch], Path]:
    """A writer of ``sparse/0`` (``quantvggt.colmap.ColmapModel.write`` or ``.write_ply``) followed by what a full
    disk did to its output: it returned normally, and ``after(folder)`` truncates a file or raises ``ENOSPC``.
    """

    def patch(out: Path, mp: pytest.MonkeyPatch) -> Path:
        from quantvggt.colmap import ColmapModel

        real = getattr(ColmapModel, writer)

        def write(self: ColmapModel, path: str | Path) -> Path:
            done = real(self, path)
            after(Path(path) if writer == "write" else Path(path).parent)
            return done

        mp.setattr(ColmapModel, writer, write)
        return out

    return patch


def _cut(name: str, size: Callable[[int], int]) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        p = folder / name
        p.write_bytes(p.read_bytes()[: size(p.stat().st_size)])  # the write "succeeded"; the file is short

    return cut


def _enospc(folder: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


INCOMPLETE = "written model is incomplete"
BROKEN: list[tuple[str, Callable[[Path, pytest.MonkeyPatch], Path], str]] = [
    ("out-is-a-file", _out_is_a_file, r"out: is a file, not a folder; cannot write .*out/scene_000 there"),
    ("out-below-a-file", _out_below_a_file, r"out: is a file, not a folder; cannot write .*out/sub/scene_000 there"),
    ("scene-output-is-a-file", _scene_output_is_a_file, r"out/scene_000: exists and is not a folder"),
    ("read-only-out", _read_only, r"out: cannot write scene_000 there \(Permission denied\)"),
    ("points-half", _full_disk(_cut("points3D.bin", lambda n: n // 2)), rf"sparse/0/points3D.bin: {INCOMPLETE}"),
    ("points-one-byte-short", _full_disk(_cut("points3D.bin", lambda n: n - 1)), rf"points3D.bin: {INCOMPLETE}"),
    ("points-empty", _full_disk(_cut("points3D.bin", lambda n: 0)), rf"points3D.bin: {INCOMPLETE}"),
    ("images-cut", _full_disk(_cut("images.bin", lambda n: n - 30)), rf"sparse/0/images.bin: {INCOMPLETE}"),
    ("cameras-cut", _full_disk(_cut("cameras.bin", lambda n: n - 8)), rf"sparse/0/cameras.bin: {INCOMPLETE}"),
    ("ply-cut", _full_disk(_cut("points3D.ply", lambda n: n - 5), "write_ply"), rf"0/points3D.ply: {INCOMPLETE}"),
    ("write-raises-enospc", _full_disk(_enospc), r"out/scene_000: cannot write the result \(No space left on device\)"),
]  # fmt: skip


@pytest.mark.parametrize(("break_it", "expect"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_unusable_output_fails_the_scene_in_one_line(
    break_it: Callable, expect: str, root: Path, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = root / "out"
    main(model, root / "data" / "scene_000", out, OPTS)  # a previous complete result
    previous = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    target = break_it(out, monkeypatch)
    with pytest.raises(OSError) as err:  # the CLI and the batch report an OSError in one line per scene
        main(model, root / "data" / "scene_000", target, OPTS)
    message = str(err.value)
    assert "\n" not in message and re.search(expect, message), message
    assert "partial" not in message  # named where the result goes, not where it was being built
    if out.is_dir():
        out.chmod(0o755)
        assert hidden(out) == []  # no temporary folder or lock left behind
        if (out / "scene_000").is_dir():  # the previous complete result is still there, unchanged
            assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == previous


def test_a_bad_output_fails_one_scene_and_the_batch_goes_on(root: Path, run_cli: Callable) -> None:
    (root / "out").mkdir()
    (root / "out" / "scene_000").write_text("a file where the result goes")
    rc, stdout, err = run_cli(
        "reconstruct", root / "data" / "scene_000", root / "data" / "scene_001", "--out", root / "out", "--model", MODEL
    )
    assert rc == 1 and "Traceback" not in stdout + err
    failed = [line for line in stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and re.search(r"^scene_000: FAILED: .*out/scene_000: exists and is not a folder", failed[0])
    assert "1 of 2 scenes reconstructed" in stdout
    assert (root / "out" / "scene_001" / "sparse" / "0" / "points3D.bin").is_file()


def _pycolmap_model(folder: Path) -> tuple[int, int]:
    """A model written by pycolmap itself: two camera models, text files too; -> (images, points)."""
    import numpy as np
    import pycolmap

    rec = pycolmap.Reconstruction()
    for cid, model, params in ((1, "PINHOLE", [5, 5, 4, 3]), (2, "OPENCV", [5, 5, 4, 3, 0.1, 0, 0, 0])):
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=8, height=6, params=params, camera_id=cid))
    kp = np.random.default_rng(0).random((20, 2)) * 5
    for i in (1, 2):
        rec.add_image_with_trivial_frame(pycolmap.Image(name=f"f{i}.png", keypoints=kp, camera_id=i, image_id=i))
        rec.frame(i).rig_from_world = pycolmap.Rigid3d(np.eye(3, 4))
        rec.register_frame(i)
    for k in range(20):
        track = pycolmap.Track([pycolmap.TrackElement(1, k), pycolmap.TrackElement(2, k)])
        rec.add_point3D(np.array([0.0, 0.0, 1.0 + k]), track, np.array([1, 2, 3], np.uint8))
    rec.write(str(folder))
    rec.write_text(str(folder))
    return 2, 20


def test_verify_model_checks_every_file_pycolmap_writes(tmp_path: Path) -> None:
    from quantvggt.verify import ModelWriteError, verify_model

    good = tmp_path / "good"
    good.mkdir()
    images, points = _pycolmap_model(good)
    assert verify_model(good, images, points, expected_cameras=2)["points"] == points
    with pytest.raises(ModelWriteError, match="points3D.bin: written model is incomplete: holds 20 points, 21 were"):
        verify_model(good, images, points + 1)
    for f in sorted(good.iterdir()):
        if f.name == "images.txt":
            continue  # only its last line is checked (its keypoint lines may be empty)
        bad = tmp_path / f"cut-{f.name}"
        shutil.copytree(good, bad)
        (bad / f.name).write_bytes(f.read_bytes()[:-2])
        with pytest.raises(ModelWriteError, match=re.escape(f"{bad / f.name}: written model is incomplete")):
            verify_model(bad, images, points)

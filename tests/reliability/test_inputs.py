"""Hostile or broken inputs to the commands around reconstruction: a clear one-line error or a skip, no traceback.

How to add a case:
- an image file ``predict`` must refuse: add ``(id, bytes, regex)`` to ``BAD_IMAGES`` (one line naming the file);
- a broken calibration manifest: add ``(id, write(path), regex)`` to ``BAD_MANIFESTS``;
- a pool layout NFDS must scan without repeating or leaving it: add ``(id, make(pool), scene names)`` to ``POOLS``;
- bad ``ReconstructionOptions``: add ``(kwargs, regex)`` to ``BAD_OPTIONS``.
Images are 56x42 synthetic frames; the model is a seeded random tiny VGGT (statistics only, no training needed).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quantvggt import synth
from quantvggt.calib import nfds
from quantvggt.reconstruct import ReconstructionOptions
from tests.reliability.test_images import png


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic scenes of 3 frames to copy from."""
    return synth.main(tmp_path_factory.mktemp("src"), scenes=3, frames=3, seed=1, size=(56, 42))


@pytest.fixture
def stats_model(tiny_model: torch.nn.Module) -> torch.nn.Module:
    """The tiny random model at 56 px (NFDS statistics only)."""
    tiny_model.config.image_size = 56
    return tiny_model


# -- 4. decompression bombs outside `reconstruct` ---------------------------------------------------------------------
BAD_IMAGES = [
    ("png-header-30000x30000", png(30000, 30000), "header claims too many pixels"),
    ("png-1x12000-sliver", png(1, 12000, raw=b"\x00\x80" * 12000), "aspect ratio 12000:1"),
    ("empty-file", b"", "file is empty"),
]


@pytest.mark.parametrize(("data", "expect"), [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_predict_refuses_a_bad_image_in_one_line_naming_it(
    data: bytes, expect: str, scenes: Path, tmp_path: Path, run_cli: Callable
) -> None:
    bad = tmp_path / "bomb.png"
    bad.write_bytes(data)
    good = scenes / "scene_000" / "frame_000.png"
    rc, out, err = run_cli("predict", good, bad, "--model", tmp_path / "no-such-model")
    assert rc == 2 and out == "", out + err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and re.search(expect, err), err
    assert "no-such-model" not in err  # images are checked before the model is loaded


def test_nfds_skips_a_bomb_in_the_pool_and_a_candidate_that_turns_into_one(
    scenes: Path,
    tmp_path: Path,
    stats_model: torch.nn.Module,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = tmp_path / "pool" / "group"
    for s in ("scene_000", "scene_001", "scene_002"):
        shutil.copytree(scenes / s, pool / s)
    (pool / "scene_000" / "zz_bomb.png").write_bytes(png(30000, 30000))  # in the pool scan: never a frame
    cands = nfds.candidate_pool([tmp_path / "pool"], frames=3)
    assert [c.scene.rsplit("/", 1)[1] for c in cands] == ["scene_000", "scene_001", "scene_002"]
    assert all("zz_bomb.png" not in c.frames for c in cands)
    # scene_001's frame replaced after the scan (the race select-calibration used to die on): skipped, the rest go on
    real = nfds.candidate_pool

    def pool_then_bomb(*a: object, **k: object) -> list[nfds.Candidate]:
        out = real(*a, **k)  # type: ignore[arg-type]
        (pool / "scene_001" / "frame_001.png").write_bytes(png(30000, 30000))
        return out

    monkeypatch.setattr(nfds, "candidate_pool", pool_then_bomb)
    out = nfds.main(stats_model, [tmp_path / "pool"], tmp_path / "sel.parquet", frames=3, n_clusters=1)
    rows = nfds.read_manifest(out)
    assert sorted(r["sample_id"] for r in rows) == ["scene_000#0", "scene_002#0"]
    assert any("scene_001#0 skipped" in r.message and "too many pixels" in r.message for r in caplog.records)


# -- 7. calibration manifests -----------------------------------------------------------------------------------------
def _table(path: Path, **columns: list) -> None:
    pq.write_table(pa.table(columns), path)


BAD_MANIFESTS: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "missing-columns",
        lambda p: _table(p, sample_id=["a"], group=["g"]),
        r"m.parquet: the selection manifest has no column 'scene', 'frames', 'selected' "
        r"\(it has 'sample_id', 'group'\)",
    ),
    ("not-parquet", lambda p: p.write_text("sample_id,scene\n"), r"m.parquet: cannot read the selection manifest"),
    ("missing-file", lambda p: None, r"m.parquet: no such selection manifest"),
    (
        "scene-folder-gone",
        lambda p: _table(p, sample_id=["s#0"], scene=["/nonexistent/s"], frames=[["a.png", "b.png"]], selected=[True]),
        r"m.parquet: selected sample s#0: /nonexistent/s/a.png: no such file",
    ),
]


@pytest.mark.parametrize(("write", "expect"), [c[1:] for c in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS])
def test_a_broken_manifest_is_one_line_naming_it(write: Callable[[Path], None], expect: str, tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    write(path)
    with pytest.raises(ValueError) as err:
        nfds.load_selected(path, image_size=56)
    assert "\n" not in str(err.value) and re.search(expect, str(err.value)), err.value


def test_pool_manifest_without_a_scene_column(tmp_path: Path) -> None:
    (tmp_path / "pool.csv").write_text("folder,group\na,b\n")
    with pytest.raises(ValueError, match=r"pool.csv: the pool manifest has no column 'scene' \(it has 'folder'"):
        nfds.candidate_pool([tmp_path / "pool.csv"])


def test_manifest_works_from_any_working_folder(
    scenes: Path, tmp_path: Path, stats_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # written with a relative pool path, then read from elsewhere: used to fail (paths relative to the old cwd)
    shutil.copytree(scenes, tmp_path / "work" / "pool")
    monkeypatch.chdir(tmp_path / "work")
    out = nfds.main(stats_model, ["pool"], "sel.parquet", frames=2, n_clusters=1, per_cluster=2)
    assert all(os.path.isabs(r["scene"]) for r in pq.read_table(out).to_pylist())  # stored absolute
    monkeypatch.chdir(tmp_path)
    assert len(nfds.load_selected(tmp_path / "work" / "sel.parquet", image_size=56)) == 2
    # a manifest whose paths are relative to its own folder (moved along with the scenes) loads from anywhere
    rows = pq.read_table(tmp_path / "work" / "sel.parquet").to_pylist()
    for r in rows:
        r["scene"] = os.path.relpath(r["scene"], tmp_path / "work")
    shutil.move(tmp_path / "work", tmp_path / "moved")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "moved" / "rel.parquet")
    assert len(nfds.load_selected(tmp_path / "moved" / "rel.parquet", image_size=56)) == 2


# -- 7. pools with symlink loops --------------------------------------------------------------------------------------
def _loop_to_self(pool: Path) -> None:
    (pool / "group" / "selfloop").symlink_to(".")


def _loop_to_parent(pool: Path) -> None:
    (pool / "group" / "up").symlink_to("..")
    (pool / "group" / "way-up").symlink_to("../..")  # the pool's own parent: outside it


def _alias(pool: Path) -> None:
    (pool / "alias").symlink_to(pool / "group" / "scene_000")  # the same scene twice: one candidate


POOLS: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("selfloop", _loop_to_self, ["scene_000", "scene_001", "scene_002"]),
    ("loops-to-ancestors", _loop_to_parent, ["scene_000", "scene_001", "scene_002"]),
    ("alias-of-a-scene", _alias, ["scene_000", "scene_001", "scene_002"]),
]


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in POOLS], ids=[c[0] for c in POOLS])
def test_pool_symlinks_never_repeat_or_leave_it(
    make: Callable[[Path], None], expect: list[str], scenes: Path, tmp_path: Path
) -> None:
    # `selfloop -> .` made one scene 41 candidates
    pool = tmp_path / "pool"
    for s in ("scene_000", "scene_001", "scene_002"):
        shutil.copytree(scenes / s, pool / "group" / s)
    (tmp_path / "outside_scene").mkdir()
    shutil.copy(scenes / "scene_000" / "frame_000.png", tmp_path / "outside_scene")
    shutil.copy(scenes / "scene_000" / "frame_001.png", tmp_path / "outside_scene")
    make(pool)
    cands = nfds.candidate_pool([pool], frames=2)
    assert sorted(Path(c.scene).resolve().name for c in cands) == expect


# -- 7. reconstruction options: before any work -----------------------------------------------------------------------
BAD_OPTIONS = [
    ({"conf_threshold": float("nan")}, "conf_threshold must be a finite number, got nan"),
    ({"conf_threshold": float("inf")}, "conf_threshold must be a finite number, got inf"),
    ({"conf_percentile": float("nan")}, "conf_percentile must be a finite number, got nan"),
    ({"max_points": -1}, "max_points must be >= 1, got -1"),
    ({"max_points": 0}, "max_points must be >= 1, got 0"),
    ({"max_points": 2.5}, "max_points must be a whole number, got 2.5"),
    ({"max_frames": True}, "max_frames must be a whole number, got True"),
    ({"max_align_residual": float("nan")}, "max_align_residual must be a finite number > 0, got nan"),
    ({"max_align_residual": 0.0}, "max_align_residual must be a finite number > 0, got 0.0"),
    ({"memory_budget_mb": float("inf")}, "memory_budget_mb must be a finite number, got inf"),
    ({"shared_camera_tol": float("nan")}, "shared_camera_tol must be a finite number, got nan"),
    ({"image_size": 100}, "image_size must be a positive multiple of 14"),
]


@pytest.mark.parametrize(
    ("kwargs", "expect"), BAD_OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_OPTIONS]
)
def test_bad_reconstruction_options_are_refused(kwargs: dict, expect: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expect)):
        ReconstructionOptions(**kwargs)


# -- 7. synth on an existing folder says what it did ------------------------------------------------------------------
def test_synth_says_what_it_kept(tmp_path: Path, run_cli: Callable) -> None:
    args = ("synth", tmp_path / "s", "--frames", "2", "--size", "56x42")
    rc, out, _ = run_cli(*args, "--scenes", "2")
    assert rc == 0 and "wrote 2 scenes" in out and "existing" not in out
    rc, out, _ = run_cli(*args, "--scenes", "3", "--seed", "5")  # used to say "wrote 3 scenes"
    assert rc == 0 and "wrote 1 scenes" in out and "kept 2 existing scene folders as they were" in out, out
    rc, out, _ = run_cli(*args, "--scenes", "2", "--overwrite")
    assert rc == 0 and "wrote 2 scenes" in out and "existing" not in out


# -- 8. a fresh clone has no reference folder beside it ----------------------------------------------------------------
FOLDER = "sha" + "red"  # the reference folder's name, spelt so this guard does not match itself


def test_nothing_reads_the_shared_folder_next_to_the_repository() -> None:
    # `make test` on a user's clone: fixtures are committed under tests/fixtures; a string naming the development
    # machine's reference folder beside the repository (or a path built from its name) would only work there.
    import io
    import tokenize

    repo = Path(__file__).resolve().parents[2]
    found = []
    for path in sorted([*(repo / "quantvggt").rglob("*.py"), *(repo / "tests").rglob("*.py")]):
        if path == Path(__file__).resolve():
            continue  # its own patterns
        text = path.read_text()
        lines = text.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            # a path literal ("../<name>/x", "<name>/fixtures") or a path joined with it (repo.parent / "<name>")
            literal = tok.type == tokenize.STRING and re.search(rf"(^|[^\w-]){FOLDER}/", tok.string)
            joined = tok.type == tokenize.STRING and re.search(r"/\s*$", lines[tok.start[0] - 1][: tok.start[1]])
            if literal or (joined and tok.string.strip("'\"") == FOLDER):
                found.append(f"{path.relative_to(repo)}:{tok.start[0]}: {tok.string}")
    assert found == []

"""Atomic folder writes (``quantvggt.fsutil.atomic_dir``): concurrent writers, killed writers, leftovers.

How to add a case:
- a way of writing one destination concurrently: add a row to ``WRITERS`` (``threads`` or ``processes``, and the swap
  used: ``exchange`` = Linux ``renameat2(RENAME_EXCHANGE)``, ``two-renames`` = the fallback elsewhere);
- a way of finding a destination after a writer was killed between the two renames: add a row to ``RECOVERIES``
  (a function of the destination that must leave a complete visible result);
- a leftover sibling: add ``(id, name builder, age in hours, removed?)`` to ``LEFTOVERS``.
Every test ends with :func:`assert_clean`: one complete result, no ``.partial``/``.old``/``.lock`` left beside it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quantvggt import fsutil
from quantvggt.fsutil import OutputError, atomic_dir, recover_dir

REPO = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()
DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: never a running process


def write_result(final: Path, writer: str, pause: float = 0.0) -> None:
    """One complete result: files that must agree (a torn result would mix writers), and a report.json."""
    with atomic_dir(final) as tmp:
        (tmp / "a.json").write_text(json.dumps({"writer": writer}))
        time.sleep(pause)
        (tmp / "b.json").write_text(json.dumps({"writer": writer}))
        (tmp / "report.json").write_text(json.dumps({"images": 3, "points": {"kept": 7}}))


def assert_clean(final: Path, writers: set[str]) -> str:
    """``final`` holds one writer's complete result and nothing is left beside it; returns that writer."""
    a = json.loads((final / "a.json").read_text())["writer"]
    b = json.loads((final / "b.json").read_text())["writer"]
    assert a == b and a in writers, (a, b)
    siblings = sorted(p.name for p in final.parent.iterdir() if p.name != final.name)
    assert siblings == [], siblings
    return a


def _two_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)


# the child process: imports only fsutil (fast); FALLBACK forces the two-rename swap, KILL exits on the 2nd rename
CHILD = """
import json, os, sys, time
from pathlib import Path
from quantvggt import fsutil
final, writer, pause, fallback, kill = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
if fallback == "1":
    fsutil._exchange = lambda a, b: False
if kill == "1":
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(src)
        if str(src).endswith(".partial") and len(calls) == 2:  # final -> .old happened; tmp -> final did not
            os._exit(9)
        real(src, dst)
    fsutil.os.replace = replace
with fsutil.atomic_dir(final) as tmp:
    (tmp / "a.json").write_text(json.dumps({"writer": writer}))
    time.sleep(pause)
    (tmp / "b.json").write_text(json.dumps({"writer": writer}))
"""


def _child(
    final: Path, writer: str, pause: float = 0.0, fallback: bool = False, kill: bool = False
) -> subprocess.Popen:
    args = [str(final), writer, str(pause), str(int(fallback)), str(int(kill))]
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, stderr=subprocess.PIPE, text=True)


WRITERS = [("threads", "exchange"), ("threads", "two-renames"), ("processes", "exchange"), ("processes", "two-renames")]


@pytest.mark.parametrize(("workers", "swap"), WRITERS, ids=["-".join(w) for w in WRITERS])
def test_concurrent_writers_both_succeed_with_one_complete_result(
    workers: str, swap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out" / "scene_000"
    write_result(final, "before")  # there is a previous result to replace, as in a re-run
    names = {f"w{i}" for i in range(4)}
    if workers == "threads":
        if swap == "two-renames":
            _two_renames(monkeypatch)
        errors: list[BaseException] = []

        def work(name: str) -> None:
            try:
                write_result(final, name, pause=0.05)
            except BaseException as e:  # collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in sorted(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    else:
        procs = [_child(final, n, pause=0.05, fallback=swap == "two-renames") for n in sorted(names)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    assert_clean(final, names)


def test_the_exchange_swap_is_used_here(tmp_path: Path) -> None:
    # Linux with ext4/tmpfs/xfs/btrfs: the swap never leaves the destination missing, even for an instant
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    if not fsutil._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here; the two-rename swap and recovery are used")
    assert (b / "x").exists() and not (a / "x").exists()


def test_a_failing_second_rename_puts_the_previous_result_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "out" / "scene_000"
    write_result(final, "before")
    _two_renames(monkeypatch)
    real, calls = os.replace, []

    def replace_failing_once(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        calls.append(src)
        if len(calls) == 2:  # final -> .old went through; tmp -> final fails
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace_failing_once)
    with pytest.raises(OSError, match="Input/output error"):
        write_result(final, "after")
    monkeypatch.setattr(fsutil.os, "replace", real)
    assert assert_clean(final, {"before"}) == "before"


def _next_write(final: Path) -> None:
    write_result(final, "after")


def _reconstruct_skip_check(final: Path) -> None:
    # reconstruct.main(overwrite=False) looks for OUT/<name>/report.json: it recovers first, so it finds it
    from quantvggt.reconstruct import main

    scene = final.parent.parent / "scene_000"
    scene.mkdir()
    res = main(None, scene, final.parent, overwrite=False)  # type: ignore[arg-type]
    assert (res.status, res.points) == ("skipped", 7)


RECOVERIES: list[tuple[str, Callable[[Path], object], set[str]]] = [
    ("recover_dir", recover_dir, {"before"}),
    ("next-write", _next_write, {"after"}),
    ("reconstruct-overwrite-false", _reconstruct_skip_check, {"before"}),
]


@pytest.mark.parametrize(("how", "recover", "expect"), RECOVERIES, ids=[r[0] for r in RECOVERIES])
def test_a_writer_killed_between_the_renames_loses_nothing(
    how: str, recover: Callable[[Path], object], expect: set[str], tmp_path: Path
) -> None:
    final = tmp_path / "out" / "scene_000"
    write_result(final, "before")
    p = _child(final, "killed", fallback=True, kill=True)
    p.communicate(timeout=120)
    assert p.returncode == 9
    assert not final.exists()  # the state a kill between the renames leaves: the previous result is only in .old
    kinds = sorted(n.name.rsplit(".", 1)[1] for n in final.parent.iterdir())
    assert kinds == ["lock", "old", "partial"], kinds  # the lock file outlives its killed holder (not its lock)
    recover(final)
    assert_clean(final, expect)


def _temp(kind: str, owner: str) -> Callable[[Path], str]:
    return lambda final: f".{final.name}.abc123xy.{owner}.{kind}"


LEFTOVERS: list[tuple[str, Callable[[Path], str], float, bool]] = [
    ("partial-dead-pid", _temp("partial", f"{DEAD_PID}@{HOST}"), 0, True),
    ("partial-live-pid", _temp("partial", f"{os.getpid()}@{HOST}"), 0, False),  # a write in progress
    ("partial-live-pid-stale", _temp("partial", f"{os.getpid()}@{HOST}"), 48, True),  # pid reused (containers)
    ("partial-other-host-fresh", _temp("partial", "1@elsewhere.example"), 1, False),
    ("partial-other-host-stale", _temp("partial", "1@elsewhere.example"), 48, True),
    ("partial-other-scene-dead-pid", lambda f: f".scene_999.abc123xy.{DEAD_PID}@{HOST}.partial", 0, True),
    ("legacy-partial-fresh", lambda f: f".{f.name}.abcd1234.partial", 1, False),
    ("legacy-partial-stale", lambda f: f".{f.name}.abcd1234.partial", 48, True),
    ("old-beside-a-result", _temp("old", f"{DEAD_PID}@{HOST}"), 0, True),
    ("legacy-old-beside-a-result", lambda f: f".{f.name}.old-{DEAD_PID}", 0, True),
    ("unrelated-hidden-folder", lambda f: ".git", 48, False),
]


@pytest.mark.parametrize(("case", "name", "age_h", "removed"), LEFTOVERS, ids=[c[0] for c in LEFTOVERS])
def test_leftovers_of_killed_writers_are_cleaned_on_the_next_write(
    case: str, name: Callable[[Path], str], age_h: float, removed: bool, tmp_path: Path
) -> None:
    final = tmp_path / "out" / "scene_000"
    write_result(final, "before")
    leftover = final.parent / name(final)
    (leftover / "sparse").mkdir(parents=True)
    past = time.time() - age_h * 3600
    os.utime(leftover, (past, past))
    write_result(final, "after")
    assert leftover.exists() != removed
    assert json.loads((final / "a.json").read_text())["writer"] == "after"


@pytest.mark.parametrize("bad", ["out/..", "out/../..", "/"])
def test_a_destination_that_is_not_a_folder_name_is_refused(bad: str, tmp_path: Path) -> None:
    # `quantvggt reconstruct x/..` once renamed the output's parent: '.' and '..' are never a destination
    final = bad if bad.startswith("/") else str(tmp_path / bad)
    with pytest.raises(OutputError, match="not a folder name to write to"), atomic_dir(final):
        pytest.fail("the body must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

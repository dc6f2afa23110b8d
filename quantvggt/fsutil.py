"""Atomic writes of files and folders, and the check that output folders never overlap their input folders.

Files and folders are built in a hidden temporary sibling and renamed into place only when complete.
Folder swaps (:func:`atomic_dir`) hold a per-destination lock (``.<name>.lock``, ``fcntl.flock``) so concurrent
writers of one destination take turns and the last complete result wins. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)``: a complete result is visible at every instant. Elsewhere (or on filesystems without
it) the previous result is renamed aside to ``.<name>.<random>.<pid>@<host>.old`` and the new one renamed in; a
writer killed between those two renames leaves no visible result until the next write or
:func:`recover_dir` puts the ``.old`` folder back. Temporary folders carry their owner's pid and host, so leftovers
of killed writers are removed when their process is gone (same host) or after :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600  # a temporary sibling older than this is a leftover whoever owns it (no write takes a day)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class OutputError(OSError):
    """An output folder cannot be written where it was asked for (one line naming the path and the problem)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"
    return f"{os.getpid()}@{host}"


# the random part of mkdtemp names is [a-z0-9_]; the owner is "<pid>@<host>" (legacy names carry no owner)
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)\.(?P<kind>partial|old)$")
_LEGACY_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.partial$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _temp_siblings(parent: Path, name: str | None = None) -> list[tuple[Path, str, bool | None]]:
    """Temporary siblings in ``parent`` (of ``name``, or of every name): (path, "partial"|"old", owner alive?).

    Owner alive is ``None`` where it cannot be known (another host, a legacy name without an owner).
    """
    out = []
    host = _owner().split("@", 1)[1]
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return out
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        m = _TEMP.match(entry.name)
        if m:
            alive = _pid_alive(int(m["pid"])) if m["host"] == host else None
            kind = m["kind"]
        elif m := _LEGACY_OLD.match(entry.name):
            alive, kind = _pid_alive(int(m["pid"])), "old"
        elif m := _LEGACY_PARTIAL.match(entry.name):
            alive, kind = None, "partial"
        else:
            continue
        if name is None or m["name"] == name:
            out.append((Path(entry.path), kind, alive))
    return out


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(parent: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove leftover ``.partial`` folders of killed writers in ``parent``; returns what was removed.

    A leftover goes when its owner (same host) is no longer running, or once it is older than ``max_age_s`` (an
    owner on another host cannot be checked, and in containers a restarted worker reuses the dead one's pid; no
    write takes that long). ``.old`` folders are left to :func:`recover_dir`, which may need them to restore a result.
    """
    removed = []
    for path, kind, alive in _temp_siblings(Path(parent)):
        if kind == "partial" and (alive is False or _age_s(path) > max_age_s):
            log.info("removing %s: left by a writer that is gone", path)
            _remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold the exclusive lock of destination ``final`` (``.<name>.lock`` beside it, removed on release)."""
    import fcntl

    path = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed the file: lock the new one, or two writers hold "the" lock
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiter on this inode then sees the change and retries
        os.close(fd)


def _recover_locked(final: Path, max_age_s: float) -> None:
    """Under the lock: restore a missing ``final`` from a ``.old`` sibling, then drop leftovers of dead writers."""
    olds = sorted((p for p, kind, _ in _temp_siblings(final.parent, final.name) if kind == "old"), key=_age_s)
    if olds and not os.path.lexists(final):
        # nobody is between the two renames of a swap (that happens under this lock): this writer was killed there
        log.warning("%s is missing after an interrupted swap; restoring the previous result from %s", final, olds[0])
        os.replace(olds[0], final)
        olds = olds[1:]
    for old in olds:  # the result is in place: these are leftovers of swaps that finished or were rolled back
        _remove(old)
    clean_stale(final.parent, max_age_s)  # a dead writer's .partial is garbage whatever its name


def recover_dir(final: str | Path, max_age_s: float = STALE_AFTER_S) -> Path:
    """Make ``final`` readable after a killed writer: restore it from ``.old`` if the swap was cut, drop leftovers.

    Called by every :func:`atomic_dir` before it writes; readers call it before deciding a result is missing.
    Without write access to the folder it does nothing (a reader cannot repair what it cannot write).
    """
    final = Path(final)
    if not final.parent.is_dir():
        return final
    try:
        with _locked(final):
            _recover_locked(final, max_age_s)
    except PermissionError as e:
        log.debug("cannot lock %s (%s); not recovering it", final, e)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES):
            raise
    return final


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False if unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # kernel, libc or filesystem (NFS, some FUSE) without it: the two-rename swap is used
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> ctypes._CFuncPtr | None:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to load (not a POSIX system)
        return None


def _swap_in(tmp: Path, final: Path) -> None:
    """Under the lock: make complete folder ``tmp`` the content of ``final``, removing the previous content."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        _remove(tmp)  # now the previous result; killed before this, it is a leftover of a dead owner
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=f".{_owner()}.old", dir=final.parent))
    os.replace(final, old)  # onto an empty folder: allowed, and the name is ours alone
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # put the previous result back
        raise
    _remove(old)


def _fsync_tree(root: Path) -> None:
    """Flush every regular file and folder under ``root`` (a full disk can first show up here, not at write)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_destination(final: str | Path) -> None:
    """Refuse (:class:`OutputError`) a destination :func:`atomic_dir` cannot write: '.'/'..', a file in the way."""
    final = Path(final)
    if final.name in ("", ".", ".."):
        raise OutputError(f"{final}: not a folder name to write to (it ends in {final.name or '/'!r})")
    for p in [final.parent, *final.parent.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{p}: is a file, not a folder; cannot write {final} there")
            break
    if os.path.lexists(final) and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; refusing to replace it")


@contextlib.contextmanager
def atomic_dir(final: str | Path, max_age_s: float = STALE_AFTER_S) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it replaces ``final``, on error it is removed.

    A reader sees the old complete folder or the new complete one, never a half-written one. Concurrent writers of
    one ``final`` take turns at the swap (the last to finish wins); leftovers of killed writers are cleaned first.
    """
    final = Path(final)
    check_destination(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(final, max_age_s)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=f".{_owner()}.partial", dir=final.parent))
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{final.parent}: cannot write {final.name} there ({e.strerror or e})") from e
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; results are shared like any folder the user makes
    try:
        yield tmp
        _fsync_tree(tmp)
        with _locked(final):
            _swap_in(tmp, final)
    except OSError as e:
        _remove(tmp)
        if e.errno in _NO_ROOM:  # raised without a file name: say which result could not be written
            raise OutputError(f"{final}: cannot write the result ({e.strerror})") from e
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it is fsynced and renamed onto ``final``, on error removed.

    Readers see the old file or the complete new one; a killed writer leaves only a hidden ``.tmp-*`` file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        yield tmp
        with open(tmp, "rb") as f:  # durable before it becomes visible
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically (see :func:`atomic_file`)."""
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``final`` atomically (see :func:`atomic_file`)."""
    return atomic_write_bytes(final, text.encode())


# -- outputs never overlap inputs -------------------------------------------------------------------------------------
def _location(path_or_uri: str | os.PathLike[str]) -> tuple[str, PurePosixPath]:
    """(scheme://bucket or "" for local, absolute path): local paths resolved through symlinks, URIs lexically."""
    text = os.fspath(path_or_uri)
    scheme, sep, rest = text.partition("://")
    if sep and scheme and "/" not in scheme and scheme != "file":
        host, _, key = rest.partition("/")
        return f"{scheme}://{host}", PurePosixPath(posixpath.normpath("/" + key))
    if sep and scheme == "file":
        text = "/" + rest.partition("/")[2]
    return "", PurePosixPath(Path(os.path.expanduser(text)).resolve().as_posix())


def is_within(path_or_uri: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path_or_uri`` is ``root`` or lies inside it (local paths resolved, URIs by bucket and key)."""
    (host, p), (root_host, r) = _location(path_or_uri), _location(root)
    return host == root_host and (p == r or r in p.parents)


def _identities(path: str | os.PathLike[str]) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """(st_dev, st_ino) of ``path`` (None if it does not exist) and of each of its existing ancestors, nearest first.

    One folder reached through two paths (a bind mount, a second mount of a share, a symlink) has one identity, so
    overlaps are found whatever the path strings say.
    """
    ids: list[tuple[int, int] | None] = []
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    for q in (p, *p.parents):
        try:
            st = os.stat(q)
        except OSError:  # not there yet (an output to be made), or unreadable: its ancestors still count
            ids.append(None)
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids[0], [i for i in ids[1:] if i is not None]


def _overlap(o_path: PurePosixPath, i_path: PurePosixPath, o: str, i: str) -> str | None:
    """How output ``o`` overlaps input ``i`` ("is", "lies inside", "contains"), by resolved path, then by inode."""
    if o_path == i_path:
        return "is the input folder"
    if i_path in o_path.parents:
        return "lies inside the input folder"
    if o_path in i_path.parents:
        return "contains the input folder"
    if not o or not i or "://" in o or "://" in i:  # URIs have no inodes
        return None
    (o_self, o_up), (i_self, i_up) = _identities(o), _identities(i)
    if o_self is not None and o_self == i_self:
        return "is the input folder"
    if i_self is not None and i_self in o_up:
        return "lies inside the input folder"
    if o_self is not None and o_self in i_up:
        return "contains the input folder"
    return None


def check_outputs_outside_inputs(
    outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str]]
) -> None:
    """Refuse (``ValueError``) an output folder that is an input folder, contains one, or lies inside one.

    Writing ``OUT/<name>`` replaces that whole folder, so an output equal to or above a scene folder deletes its
    images, and one inside it becomes part of the scene. Local paths are compared with symlinks resolved and by
    device and inode of every ancestor (a bind mount or a second mount of one folder has another path but the same
    inode); URIs (``s3://bucket/key``) by bucket and normalised key. Call it before any work.
    """
    ins = [(i, _location(i)) for i in inputs]
    for o in outputs:
        (o_root, o_path) = _location(o)
        for i, (i_root, i_path) in ins:
            if o_root != i_root:
                continue
            how = _overlap(o_path, i_path, os.fspath(o), os.fspath(i))
            if how is None:
                continue
            raise ValueError(
                f"output {o} {how} {i}: writing it would replace or mix with the scene's images; "
                "choose an output folder outside the scene folders"
            )


def _folder_is_empty(path: Path) -> bool:
    try:
        return next(os.scandir(path), None) is None
    except OSError:
        return False


def check_output_folder(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), own_marker: str | None = None
) -> None:
    """Refuse a folder that :func:`atomic_dir` would replace when it is not ours, or overlaps an input.

    ``out`` may be missing, an empty folder, or a folder holding ``own_marker`` (e.g. ``quant.json``: a result we
    wrote before); anything else is someone's data and is never replaced (``ValueError``). ``out`` may not be an
    input, lie inside one or contain one (compared by inode, see :func:`check_outputs_outside_inputs`); a file in
    the way is an :class:`OutputError`. Call it before any work.
    """
    check_outputs_outside_inputs([out], inputs)
    final = Path(out)
    check_destination(final)
    if own_marker and final.is_dir() and not _folder_is_empty(final) and not (final / own_marker).is_file():
        raise ValueError(
            f"{out}: is a folder that is not empty and has no {own_marker} (not one of our results); "
            "refusing to replace it: choose a new or empty folder"
        )


def check_output_file(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    is_own: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse an output file that would land onto or inside an input, or replace a file that is not ours.

    ``is_own(path)`` says whether an existing file is one we wrote (and may replace); without it any existing
    file is refused. A folder where the file should be is refused too. Raises ``ValueError`` (one line).
    """
    path = Path(out)
    check_outputs_outside_inputs([path], inputs)
    if path.is_dir():
        raise ValueError(f"{out}: is a folder; give a file name")
    if os.path.lexists(path) and not (is_own is not None and path.is_file() and is_own(path)):
        raise ValueError(f"{out}: exists and is not one of our results; refusing to replace it")

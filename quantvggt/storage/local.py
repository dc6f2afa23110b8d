"""Local folders (plain paths and ``file://`` URIs) as storage."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from quantvggt.fsutil import atomic_file, atomic_write_bytes
from quantvggt.storage.base import Storage, local_path, register_backend, safe_join, sha256_file


class LocalStorage(Storage):
    """A local folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = (local_path(root) or Path(root)).resolve()
        self.root_uri = str(self.root)

    def _p(self, key: str) -> Path:
        return safe_join(self.root, key.lstrip("/"), allow_root=True)  # keys are root-relative; "" is the root

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in start.rglob("*") if p.is_file()]
        return sorted(
            k for k in keys if k.startswith(prefix.lstrip("/")) and not PurePosixPath(k).name.startswith(".tmp-")
        )

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    # atomic_file's temporaries are named .tmp-<name>.<random>, which list() leaves out
    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._p(key), data)

    def download(self, key: str, dest: str | Path) -> Path:
        with atomic_file(dest) as tmp:
            shutil.copyfile(self._p(key), tmp)
        return Path(dest)

    def upload(self, src: str | Path, key: str) -> str:
        with atomic_file(self._p(key)) as tmp:
            shutil.copyfile(src, tmp)
            digest = sha256_file(tmp)
        return digest

    def delete_prefix(self, prefix: str) -> None:
        p = self._p(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.is_file():
            p.unlink()

    def checksum(self, key: str) -> str:
        return sha256_file(self._p(key))

    def local_root(self) -> Path | None:
        return self.root


register_backend("", LocalStorage)
register_backend("file", LocalStorage)

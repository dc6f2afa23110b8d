"""``memory://name/prefix``: an in-process store (tests, dry runs); one store per name per process."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from quantvggt.fsutil import atomic_file
from quantvggt.storage.base import ObjectNotFoundError, Storage, register_backend, sha256_file

_STORES: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


class MemoryStorage(Storage):
    """Objects in a dict of this process; writes replace whole objects, so readers never see half of one."""

    def __init__(self, uri: str) -> None:
        name, _, base = uri[len("memory://") :].partition("/")
        if not name:
            raise ValueError(f"{uri}: no store name (memory://NAME/prefix)")
        self.base = base.strip("/")
        self.root_uri = f"memory://{name}/{self.base}".rstrip("/")
        with _LOCK:
            self.objects = _STORES.setdefault(name, {})

    def _k(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.base}/{key}" if self.base else key

    def list(self, prefix: str = "") -> list[str]:
        full = self._k(prefix)
        with _LOCK:
            keys = list(self.objects)
        cut = len(self.base) + 1 if self.base else 0
        return sorted(k[cut:] for k in keys if k.startswith(full) and (not self.base or k.startswith(self.base + "/")))

    def exists(self, key: str) -> bool:
        return self._k(key) in self.objects

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.objects[self._k(key)]
        except KeyError:
            raise ObjectNotFoundError(f"{self.uri(key)}: no such object") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        with _LOCK:
            self.objects[self._k(key)] = bytes(data)

    def download(self, key: str, dest: str | Path) -> Path:
        data = self.read_bytes(key)
        with atomic_file(dest) as tmp:
            tmp.write_bytes(data)
        return Path(dest)

    def upload(self, src: str | Path, key: str) -> str:
        self.write_bytes(key, Path(src).read_bytes())
        return sha256_file(src)

    def delete_prefix(self, prefix: str) -> None:
        with _LOCK:
            for k in [k for k in self.objects if k.startswith(self._k(prefix))]:
                del self.objects[k]

    def checksum(self, key: str) -> str:
        return hashlib.sha256(self.read_bytes(key)).hexdigest()


def clear(name: str | None = None) -> None:
    """Forget store ``name`` (every store when None)."""
    with _LOCK:
        if name is None:
            _STORES.clear()
        else:
            _STORES.pop(name, None)


register_backend("memory", MemoryStorage)

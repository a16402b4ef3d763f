"""The artifact store: where adapter files live once published.

A small interface shaped like an object store (keys with `/`, whole-object puts, streamed
reads), so an S3-compatible implementation can follow; `FileSystemStore` keeps objects
under `ARTIFACT_ROOT`. Puts are atomic: the bytes go to a temporary file in the same
file system, are flushed to disk, then renamed into place, so a reader never sees a
half-written object and a crash leaves at most a stray temporary file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from service.config import get_settings

CHUNK = 1 << 20


class StoreError(OSError):
    """The store could not be read or written (a transient condition for callers)."""


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...
    def delete_prefix(self, prefix: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad artifact key {key!r}")
    return key


class FileSystemStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, source: Path) -> None:
        dest = self.path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
            with source.open("rb") as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise StoreError(f"cannot write {key}: {exc}") from exc

    def get_file(self, key: str, dest: Path) -> None:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path(key), dest)
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.path(key).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix.rstrip("/")), ignore_errors=True)


@lru_cache
def get_store() -> ArtifactStore:
    return FileSystemStore(get_settings().artifact_root)

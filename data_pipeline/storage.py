"""File access through fsspec: one code path for local paths, file://, memory://, s3://, gs://, hf://.

Writes are crash safe: the bytes go to a temporary name first, are flushed (fsync on a local
disk), and only then renamed over the final name, so a reader never sees a half-written file
under its real name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data_pipeline.errors import DataError


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package is not installed
        raise DataError(f"{url}: cannot open this location ({exc})") from exc


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def atomic_write_local(path: str | Path, data: bytes) -> None:
    """Write data to a local path so that it holds either the old content or all of the new."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write data under path so that path holds either the old content or all of the new."""
    if is_local(fs):
        return atomic_write_local(path, data)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, what: str = "file") -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {what} not found") from exc

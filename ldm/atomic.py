"""Atomic writes: a file or folder appears under its real name complete, or not at all.

Everything is written under a temporary name beside the target (`.NAME.tmp-PID`), flushed to disk,
then renamed over the target with `os.replace`, which is atomic on POSIX and Windows within one
file system. A process killed at any moment therefore leaves the old content or the new one, never
half of either, and the temporary name is removed when the write fails.

    with atomic_path("model.safetensors") as tmp:
        save_file(tensors, str(tmp))
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden name beside `path` that a write in progress (or an old copy) uses."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write one file to; when the block succeeds, the file
    is synced to disk and renamed to `path` (replacing what was there). Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; when the block succeeds, its files are
    synced and it replaces `path` (an existing folder there is moved aside, then deleted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for item in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
                if item.is_dir():
                    fsync_dir(item)
                else:
                    fsync_file(item)
            fsync_dir(tmp)
        if path.exists():
            old = temporary_name(path, "old")
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

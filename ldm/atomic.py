"""Atomic writes: a file or folder appears under its real name complete, or not at all; and the
checks before writing (a folder that can be written, enough free space).

Everything is written under a temporary name beside the target (`.NAME.tmp-PID`), flushed to disk,
then renamed over the target with `os.replace`, which is atomic on POSIX and Windows within one
file system. A process killed at any moment therefore leaves the old content or the new one, never
half of either, and the temporary name is removed when the write fails. What a killed process
leaves behind (`.NAME.tmp-PID`, `.NAME.old-PID`) is found by `leftovers` and removed by whoever
owns the folder next (`remove_leftovers`).

    with atomic_path("model.safetensors") as tmp:
        save_file(tensors, str(tmp))
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# `.NAME.tmp-PID` (a write in progress) and `.NAME.old-PID` (a replaced folder being deleted).
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+$")
# The errors of a disk that cannot take the write, and what to tell the user about each.
DISK_ERRORS = {errno.ENOSPC: "the disk is full", getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.EEXIST: "a file of that name is in the way"}


class DiskError(OSError):
    """A write that failed, or would fail, for want of space or permission; the message says which
    and what to do (`errno` keeps the system's code)."""

    def __str__(self) -> str:
        return str(self.strerror)


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden name beside `path` that a write in progress (or an old copy) uses."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def leftovers(folder: str | Path) -> list[Path]:
    """The temporary files and folders that interrupted writes left directly in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if LEFTOVER.match(p.name))


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete what interrupted writes left in `folder` (call only while no other process writes
    there); returns what was removed."""
    found = leftovers(folder)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Raise a DiskError that says so when the disk holding `folder` (or its nearest existing parent)
    has less than `needed` bytes free for `what`."""
    place = Path(folder).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < needed:
        raise DiskError(errno.ENOSPC, f"not enough free disk space for {what} in {folder}: it needs about "
                        f"{format_bytes(needed)}, {format_bytes(free)} are free; free some space or write elsewhere")


def disk_error(error: OSError, what: str, where: str | Path, advice: str = "") -> OSError:
    """`error` (raised while writing `what` to `where`) as a DiskError whose message says what went
    wrong in words (and `advice`), or `error` itself when it is not about the disk."""
    tail = f"; {advice}" if advice else ""
    if isinstance(error, DiskError):
        return DiskError(error.errno, f"{error}{tail}") if tail else error
    reason = DISK_ERRORS.get(error.errno)
    if reason is None:
        return error
    free = ""
    try:
        free = f"; {format_bytes(shutil.disk_usage(Path(where)).free)} free"
    except OSError:
        pass
    return DiskError(error.errno, f"cannot write {what} to {where}: {reason} ({error.strerror or error}){free}{tail}")


def check_writable_dir(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove it takes files (a probe written and removed), so a long
    job learns before it starts, not at its first save, that its output cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder; pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(folder / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise disk_error(e, what, folder) from None
    return folder


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


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no copy, same file system), or a copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_over(old: Path, new: Path) -> None:
    """Put every entry of folder `old` that `new` does not have into `new` (files hard-linked or
    copied, links kept as links), leaving `old` as it was."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


@contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = True, keep_others: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; when the block succeeds, its files are
    synced and it replaces `path` (an existing folder there is moved aside, then deleted). With
    `keep_others`, the entries of the existing folder that the new content does not replace are
    carried over into it first (hard links, so nothing is copied twice), so only what was written
    is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if keep_others and path.is_dir():
            carry_over(path, tmp)
        if fsync:
            for item in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
                if item.is_symlink():
                    continue
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

"""The spool's low-level file operations: creating without following symlinks, writing
all of a buffer, one fsync per file, directory fsyncs shared among callers (group commit),
reads that leave access times alone, and the clean-up of a failed write.

Paths are plain strings where a message passes: pathlib's joins cost more than the
system calls they lead to. Every function here blocks on the disk as its system calls do;
the callers say which of them the event loop may make (relay.spool.marks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import SpoolError, SpoolFull

OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_SPARE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_READ = os.O_RDONLY | os.O_CLOEXEC
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_read(path: str | Path, flags: int = OPEN_READ) -> int:
    """Open a spool file for reading without touching its access time (also an opener
    for open()). A deferred entry's mtime is its next attempt, later than any atime, so
    under relatime every read would update the atime and dirty the inode. O_NOATIME is for
    the file's owner (or CAP_FOWNER); anyone else reads as usual."""
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def create(path: str | Path, parts: list[bytes]) -> int:
    """Create `path` (never through a symlink, never over an existing file) holding
    `parts`; return the open descriptor."""
    fd = os.open(path, OPEN_NEW, 0o600)
    write_all(fd, parts)
    return fd


def touch(path: str | Path) -> None:
    """Create `path` empty if it is not there (never through a symlink)."""
    os.close(os.open(path, OPEN_NEW & ~os.O_EXCL, 0o600))


def overwrite(path: str, parts: list[bytes]) -> int:
    """Write `parts` over the existing file at `path` (never through a symlink), cut it to
    their length, and return the open descriptor."""
    fd = os.open(path, OPEN_SPARE)
    write_all(fd, parts)
    try:
        os.ftruncate(fd, sum(len(part) for part in parts))
    except BaseException:
        os.close(fd)
        raise
    return fd


def empty(path: str) -> None:
    """Truncate a kept file to 0 bytes through a descriptor that never follows a symlink,
    whoever put one at its name."""
    fd = os.open(path, OPEN_SPARE)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def write_all(fd: int, parts: list[bytes]) -> None:
    """Write `parts` to `fd`; on failure, close it and raise."""
    try:
        view_parts = [memoryview(p) for p in parts if p]
        while view_parts:
            written = os.writev(fd, view_parts)
            while view_parts and written >= len(view_parts[0]):
                written -= len(view_parts[0])
                view_parts.pop(0)
            if view_parts:
                view_parts[0] = view_parts[0][written:]
    except BaseException:
        os.close(fd)
        raise


def write_durably(path: str | Path, parts: list[bytes]) -> None:
    """Create `path` (never through a symlink, never over an existing file), write, fsync."""
    fd = create(path, parts)
    try:
        fsync_once(fd)
    finally:
        os.close(fd)


def set_mtime(fd: int, when: float) -> None:
    """Set the open file's mtime (and atime) to `when`; on failure, close it and raise."""
    try:
        os.utime(fd, (when, when))
    except BaseException:
        os.close(fd)
        raise


def fsync_once(fd: int) -> None:
    """fsync `fd`. An error means the data may be gone: the caller discards the file and
    never retries fsync on this descriptor (PostgreSQL's "fsyncgate" lesson)."""
    os.fsync(fd)


def fsync_directory(path: str | Path) -> None:
    fd = os.open(path, _OPEN_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | Path) -> None:
    """Unlink `path`, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def failed_write_removes(tmp: str | Path) -> Iterator[None]:
    """A failed write of `tmp` leaves nothing behind and raises SpoolFull (no space) or
    SpoolError; a bug's exception passes through."""
    try:
        yield
    except BaseException as exc:
        unlink_quietly(tmp)
        if not isinstance(exc, OSError):
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SpoolFull(f"spool write failed: {exc.strerror}") from None
        raise SpoolError(f"spool write failed: {exc.strerror}") from None


class GroupSync:
    """fsync of one directory, shared by the callers that need it at the same time.

    A rename is durable once an fsync of its directory that began after the rename has
    returned. So each caller waits for the next fsync to start and finish, and callers
    that arrive while one runs share the one after it (group commit). A failed fsync fails
    every caller it was meant to cover, and none of them is retried on the same hope.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._requested = 0  # callers so far, numbered in order of arrival
        self._synced = 0  # every caller up to this number is durable
        self._failed: tuple[int, OSError] | None = None  # (up to caller, error)
        self._syncing = False

    def sync(self) -> None:
        """Return once a directory fsync that began after this call has succeeded; raise
        its OSError if it failed."""
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._synced < mine:
                if self._failed is not None and mine <= self._failed[0]:
                    raise self._failed[1]
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                covered = self._requested
                self._cond.release()
                try:
                    fsync_directory(self._path)
                except OSError as exc:
                    self._cond.acquire()
                    self._failed = (covered, exc)
                else:
                    self._cond.acquire()
                    self._synced = covered
                finally:
                    self._syncing = False
                    self._cond.notify_all()

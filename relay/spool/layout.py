"""The spool's directories, its lock, its free space, and the paths of its files: the base
the other parts of Spool build on (relay.spool's docstring draws the layout).

A file whose name is not a queue ID (or one whose ID is in two queues) is not ours: every
listing skips it and tells `on_foreign` once, and nothing moves or deletes it.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..entry import Queue
from ..errors import ForeignFile, SpoolError, SpoolFull, SpoolLocked
from .files import GroupSync
from .formats import ID_PATTERN
from .marks import blocking, loop_safe

QUEUE_DIRS = tuple(q.value for q in Queue)
ALL_DIRS = ("tmp", *QUEUE_DIRS, "corrupt", "state", "wake", "history")
UPSTREAMS_FILE = "upstreams.json"  # the daemon's view of its upstreams (publish_upstreams)
# What the relay itself writes in tmp/: an entry, a kept spare, a state record or the
# upstreams' view in the making.
TMP_PATTERN = re.compile(r"^(?:[0-9A-F]{21}(\.spare|\.state\.[0-9a-f]{8})?"
                         rf"|{re.escape(UPSTREAMS_FILE)}\.[0-9a-f]{{8}})$")
# The queues of entries still to be delivered.
WAITING = (Queue.INCOMING, Queue.ACTIVE, Queue.DEFERRED)
RETRY = "RETRY"  # in wake/: an operator asked for mail to be tried again (ask_retry)


class Layout:
    """One spool directory's layout; Spool adds the reads, the transitions and ingest."""

    def __init__(self, path: Path, min_free: int = 0) -> None:
        self.path = Path(path)
        self._root = str(self.path)
        self.min_free = min_free
        self._lock_fd: int | None = None
        self._syncs = {name: GroupSync(self.path / name) for name in ALL_DIRS}
        # Told once per file of a file in the spool that is not ours (it is skipped).
        self.on_foreign: Callable[[ForeignFile], None] = lambda problem: None
        self._reported: set[str] = set()

    @blocking
    def open(self) -> None:
        """Create the directories (0700) or check them; refuse symlinks anywhere in the
        layout, and directories of another user, who could rename anything in them or
        plant a symlink for the relay to follow."""
        for directory in (self.path, *(self.path / name for name in ALL_DIRS)):
            if directory.is_symlink():
                raise SpoolError(f"{directory} is a symbolic link; refusing to use it as spool")
            try:
                directory.mkdir(mode=0o700, exist_ok=True)
                found = os.lstat(directory)
                if found.st_uid != os.geteuid():
                    raise SpoolError(f"spool directory {directory} belongs to uid "
                                     f"{found.st_uid}, not to the relay's user "
                                     f"(uid {os.geteuid()}); refusing to use it")
                if found.st_mode & 0o077:
                    directory.chmod(0o700)
            except OSError as exc:
                raise SpoolError(
                    f"cannot use spool directory {directory}: {exc.strerror}") from None
            if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
                raise SpoolError(f"spool directory {directory} is not writable")

    @loop_safe
    def lock(self) -> None:
        """Take the single-instance lock, or raise SpoolLocked at once; the kernel releases
        it when the process dies."""
        path = self.path / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"another relay is serving the spool {self.path}") from None
        self._lock_fd = fd

    @loop_safe
    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- room for new mail --------------------------------------------------------------

    @loop_safe
    def check_room(self, size: int) -> None:
        """Raise SpoolFull unless `size` more bytes leave at least min_free on the disk."""
        if self.free_bytes() - size < self.min_free:
            raise SpoolFull("insufficient free space in the spool")

    @loop_safe
    def free_bytes(self) -> int:
        """Bytes free on the spool's filesystem for an unprivileged writer."""
        try:
            stat = os.statvfs(self.path)
        except OSError as exc:
            raise SpoolError(f"cannot stat spool filesystem: {exc.strerror}") from None
        return stat.f_bavail * stat.f_frsize

    @loop_safe
    def write_problem(self) -> str | None:
        """Why a new message could not be stored now, or None: free space and inodes
        above spool.min_free, the queue directories writable (a read-only remount fails
        access() too). Two system calls per directory, cheap enough for every probe."""
        try:
            stat = os.statvfs(self.path)
        except OSError as exc:
            return f"cannot stat the spool filesystem: {exc.strerror}"
        free = stat.f_bavail * stat.f_frsize
        if free <= self.min_free:
            return f"{free} bytes free, spool.min_free is {self.min_free}"
        if stat.f_files and not stat.f_favail:
            return "no free inodes"
        for name in ("tmp", Queue.INCOMING.value, "state"):
            if not os.access(self.path / name, os.W_OK | os.X_OK):
                return f"{self.path / name} is not writable"
        return None

    # --- paths and listings -------------------------------------------------------------

    def _file(self, queue: Queue, entry_id: str) -> str:
        # A string, not a Path: every message passes through several of these joins, on
        # the event loop or ahead of its fsync, and pathlib's cost more than the syscalls.
        return f"{self._root}/{queue.value}/{entry_id}"

    def _tmp_file(self, entry_id: str) -> str:
        return f"{self._root}/tmp/{entry_id}"

    def _state_file(self, entry_id: str) -> str:
        return f"{self._root}/state/{entry_id}"

    def _ids(self, directory: str) -> list[str]:
        """The queue IDs in one spool directory; any other name is reported and skipped."""
        names = os.listdir(f"{self._root}/{directory}")
        ids = [name for name in names if ID_PATTERN.match(name)]
        if len(ids) != len(names):
            for name in set(names).difference(ids):
                self._foreign(f"{self._root}/{directory}/{name}", "not a queue ID; skipped")
        return ids

    def _twice(self, entry_id: str, first: Queue, second: Queue) -> bool:
        """Whether the ID is in both queues now (reported, the second copy to be skipped),
        rather than an entry that moved between two listings."""
        if os.path.exists(self._file(first, entry_id)) and \
                os.path.exists(self._file(second, entry_id)):
            self._foreign(self._file(second, entry_id),
                          f"the same queue ID is in {first.value}/ too; skipped")
            return True
        return False

    def _foreign(self, path: str, reason: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            self.on_foreign(ForeignFile(path, reason))

    def _sync_dir(self, name: str) -> None:
        self._syncs[name].sync()

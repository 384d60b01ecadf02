"""Listing and reading the spool: entries, their contents, the queues' counts and due
times, and the upstream states a running daemon publishes for the commands.

Reads never change an entry, and never touch a file's access time (files.open_read). A
listing of several directories may see an entry that moves meanwhile twice or not at
all; entries() looks again for those it missed.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from typing import Any

from ..entry import Entry, Queue
from ..errors import CorruptEntry, EntryNotFound, SpoolError
from .files import create, open_read, unlink_quietly
from .formats import (
    ENVELOPE_LIMIT,
    HEADER_READ,
    ID_PATTERN,
    arrival_of,
    decode_state,
    decode_upstreams,
    encode_upstreams,
    entry_from_envelope,
    is_valid_id,
    parse_envelope,
)
from .layout import UPSTREAMS_FILE, WAITING, Layout
from .marks import blocking, loop_safe


class Reading(Layout):
    """The spool's reads: one entry, listings, and the upstream states."""

    # --- one entry ----------------------------------------------------------------------

    @loop_safe
    def load(self, queue: Queue, entry_id: str, has_state: bool = True) -> Entry:
        """The entry and its state record; `has_state=False` (known from a listing of
        state/) skips looking for the record."""
        # Plain string paths: `relay queue` loads every entry, and pathlib's joins cost
        # more than the two small reads.
        path = f"{self._root}/{queue.value}/{entry_id}"
        fd = open_read(path)
        try:
            header, _ = read_envelope(fd, path)
        finally:
            os.close(fd)
        entry = entry_from_envelope(header, queue, path)
        if not has_state:
            return entry
        state_path = self._state_file(entry_id)
        try:
            with open(state_path, "rb", opener=open_read) as f:
                data = f.read()
        except FileNotFoundError:
            return entry
        except OSError as exc:
            raise CorruptEntry(state_path, f"unreadable state record: {exc}") from None
        return decode_state(data, entry, state_path)

    @loop_safe
    def find(self, entry_id: str) -> Entry:
        """The entry with this ID, wherever it is; EntryNotFound if none."""
        return self._find_in(tuple(Queue), entry_id)

    @loop_safe
    def content(self, entry: Entry) -> bytes:
        """The message bytes (with our Received: header) of an entry. One read of the
        whole file: the event loop reads small ones, a thread large ones."""
        path = self._file(entry.queue, entry.id)
        try:
            with open(path, "rb", buffering=0, opener=open_read) as f:
                _, offset = read_envelope(f.fileno(), str(path))
                f.seek(offset)
                return f.readall()
        except OSError as exc:
            raise SpoolError(f"cannot read {path}: {exc.strerror}") from None

    @loop_safe
    def waiting_until(self, entry_id: str) -> float | None:
        """When a deferred or scheduled entry is due (its mtime); None if it is in neither."""
        for queue in (Queue.DEFERRED, Queue.SCHEDULED):
            try:
                return os.stat(self._file(queue, entry_id)).st_mtime
            except FileNotFoundError:
                continue
        return None

    def _find_in(self, queues: tuple[Queue, ...], entry_id: str) -> Entry:
        for queue in queues:
            try:
                return self.load(queue, entry_id)
            except FileNotFoundError:
                continue
        raise EntryNotFound(entry_id)

    # --- listings -----------------------------------------------------------------------

    @blocking
    def entries(self, queues: tuple[Queue, ...] = tuple(Queue)) -> Iterator[Entry | CorruptEntry]:
        """Every entry in the given queues, oldest first; unparsable ones as CorruptEntry."""
        names = sorted(self._listed(queues).items())
        # After the queues: a record is written before its entry moves, so one missing
        # here was missing when its entry was listed. Most entries have none, and a
        # failed open per entry would be the largest cost of listing a big queue.
        with_state = set(os.listdir(self.path / "state"))
        for name, queue in names:
            try:
                yield self.load(queue, name, name in with_state)
            except FileNotFoundError:
                try:  # moved on by the daemon since it was listed
                    yield self._find_in(queues, name)
                except EntryNotFound:
                    continue  # delivered or deleted meanwhile
                except CorruptEntry as exc:
                    yield exc
            except CorruptEntry as exc:
                yield exc

    def _listed(self, queues: tuple[Queue, ...]) -> dict[str, Queue]:
        """The queue of every ID in `queues`, an ID in two of them reported once."""
        seen: dict[str, Queue] = {}
        for queue in queues:
            for name in self._ids(queue.value):
                if name not in seen or not self._twice(name, seen[name], queue):
                    seen[name] = queue
        # A second look: an entry that the daemon moved on (deferred/ to active/, say) just
        # as the listing passed from one directory to the next was in neither listing.
        for queue in queues:
            missed = [n for n in os.listdir(f"{self._root}/{queue.value}") if n not in seen]
            for name in missed:
                if ID_PATTERN.match(name):
                    seen[name] = queue
        return seen

    @blocking
    def queue_ids(self, queue: Queue) -> list[str]:
        return sorted(self._ids(queue.value))

    @blocking
    def corrupt_ids(self) -> list[str]:
        return sorted(self._ids("corrupt"))

    @loop_safe
    def active_ids(self) -> list[str]:
        """The IDs in active/: the delivery workers' entries, and any left without one."""
        return self._ids(Queue.ACTIVE.value)

    @loop_safe
    def incoming_version(self) -> int:
        """Changes whenever an entry is added to or leaves incoming/ (directory mtime)."""
        return os.stat(self.path / Queue.INCOMING.value).st_mtime_ns

    @blocking
    def due_times(self) -> list[tuple[str, float]]:
        """(id, due time) of every entry that may be attempted: incoming now, deferred and
        scheduled at their mtimes. Reads directories only, never an entry."""
        due: list[tuple[str, float]] = []
        incoming = set(self._ids(Queue.INCOMING.value))
        due.extend((name, 0.0) for name in incoming)
        for queue in (Queue.DEFERRED, Queue.SCHEDULED):
            with os.scandir(self.path / queue.value) as it:
                for e in it:
                    if not is_valid_id(e.name):
                        self._foreign(e.path, "not a queue ID; skipped")
                    elif e.name not in incoming or not self._twice(e.name, Queue.INCOMING,
                                                                      queue):
                        due.append((e.name, e.stat().st_mtime))
        return due

    @blocking
    def counts(self) -> dict[str, int]:
        """How many entries each queue holds, by the state an operator sees."""
        return {queue.state: len(self._ids(queue.value)) for queue in Queue}

    @blocking
    def census(self) -> tuple[dict[str, int], float | None]:
        """counts(), and the arrival time of the oldest entry still to be delivered
        (queued, active or deferred), None if there is none. Directory listings only: a
        queue ID starts with its arrival time, so no entry is opened."""
        counts: dict[str, int] = {}
        oldest: str | None = None
        for queue in Queue:
            names = os.listdir(self.path / queue.value)
            counts[queue.state] = len(names)
            if names and queue in WAITING:
                first = min(names)
                if not is_valid_id(first):  # a stray file: look past it (rare, so slower)
                    first = min((n for n in names if is_valid_id(n)), default=first)
                oldest = first if oldest is None else min(oldest, first)
        return counts, None if oldest is None else arrival_of(oldest)

    # --- the daemon's view of its upstreams ---------------------------------------------

    @loop_safe
    def publish_upstreams(self, states: dict[str, Any]) -> None:
        """Replace the running daemon's view of its upstreams (UPSTREAMS_FILE), for
        `relay queue` and `relay check`. Written and renamed, not fsynced: after a crash
        it is stale, and a new daemon writes its own."""
        tmp = f"{self._root}/tmp/{UPSTREAMS_FILE}.{secrets.token_hex(4)}"
        try:
            fd = create(tmp, [encode_upstreams(states)])
            os.close(fd)
            os.replace(tmp, f"{self._root}/{UPSTREAMS_FILE}")
        except OSError:
            unlink_quietly(tmp)  # a view for operators: delivery goes on without it

    @loop_safe
    def upstream_states(self) -> dict[str, Any] | None:
        """The daemon's view of its upstreams, if one was published and a daemon holds the
        spool now; None otherwise."""
        if not self._served():
            return None
        try:
            with open(f"{self._root}/{UPSTREAMS_FILE}", "rb", opener=open_read) as f:
                return decode_upstreams(f.read())
        except (OSError, ValueError):
            return None

    def _served(self) -> bool:
        """Whether a `relay serve` holds the spool's lock now."""
        try:
            fd = os.open(self.path / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def read_envelope(fd: int, where: str) -> tuple[dict[str, Any], int]:
    """The envelope of the entry open at `fd`, and the offset where its content begins.
    One read of a few KiB holds the envelope of almost every entry: `relay queue` reads
    one per entry, so buffered line reads (and their syscalls) would dominate it."""
    head = os.read(fd, HEADER_READ)
    # A read of a regular file comes back short only at its end, so a small entry's size
    # is known without the fstat that `relay queue` would otherwise make for each one.
    size = len(head) if len(head) < HEADER_READ else os.fstat(fd).st_size
    parsed = parse_envelope(head, size, where)
    while parsed is None:  # a long envelope (many recipients): read on, doubling
        more = os.read(fd, min(len(head), ENVELOPE_LIMIT - len(head)))
        head += more
        # A file cut short meanwhile has no more than was read.
        parsed = parse_envelope(head, size if more else len(head), where)
    return parsed

"""The delivery history: one journal record per recipient's final outcome (sent, failed,
expired, or deleted by an operator), kept in the spool after the entry is gone.

    spool/history/2026-12-04.jsonl    one JSON object per line, the UTC day of the outcome

Files are append-only (O_APPEND: the daemon and `relay queue delete` both write) and
rotated daily by name; `history.keep` old days are deleted once a day. The daemon's
records are written by a thread of their own (HistoryWriter), never on the event loop:
delivery hands it the entry before and after an attempt, and the thread works out the
records, encodes and writes them as they come, and fsyncs at most SYNC_EVERY seconds
after the first unsynced write, so a power cut loses at most about that much history
and never any mail. A torn last line (a crash mid-write) is terminated before the next
append and skipped by readers (relay.history_query).

Each line has the same keys in the same order, so relay.history_query can find records
by a byte search before it parses any JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .entry import Entry, Status
from .policy import is_expiry

logger = logging.getLogger("relay.history")

STATUSES = ("sent", "failed", "expired", "deleted")
SYNC_EVERY = 1.0  # seconds: at most this much history is lost on a power cut
PRUNE_CHECK = 3600.0  # seconds: the longest an idle writer sleeps before it looks at the day
DAY = 86400
FILE_NAME = re.compile(r"^(\d{4}-\d\d-\d\d)\.jsonl$")
OPEN_APPEND = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class Record:
    """One recipient's final outcome."""

    at: float  # when it happened
    status: str  # one of STATUSES
    id: str  # queue ID
    message_id: str | None
    sender: str  # "" for the null sender
    recipient: str
    size: int
    arrived: float
    send_at: float | None  # the time it was scheduled for, if it was
    delay: float  # seconds from when it was due (arrival, or send_at) to `at`
    attempts: int
    relay: str | None  # the upstream of the last attempt (host:port)
    reply: str | None  # the upstream's final word for this recipient


def outcomes(before: Entry, after: Entry, now: float) -> list[Record]:
    """The records of an attempt: each recipient pending before it and settled by it."""
    relay = after.attempts[-1].relay if after.attempts else None
    records = []
    for old, new in zip(before.recipients, after.recipients, strict=True):
        if old.status is not Status.PENDING or new.status is Status.PENDING:
            continue
        if new.status is Status.SENT:
            status = "sent"
        else:
            status = "expired" if is_expiry(new.reply) else "failed"
        records.append(_record(after, new.address, status, now, relay, new.reply))
    return records


def deletions(entry: Entry, now: float) -> list[Record]:
    """The records of an entry an operator deleted: its recipients not yet settled."""
    relay = entry.attempts[-1].relay if entry.attempts else None
    return [_record(entry, r.address, "deleted", now, relay, r.reply) for r in entry.pending]


def _record(entry: Entry, recipient: str, status: str, now: float, relay: str | None,
            reply: str | None) -> Record:
    due = max(entry.arrived, entry.send_at or 0.0)
    return Record(at=now, status=status, id=entry.id, message_id=entry.message_id,
                  sender=entry.sender, recipient=recipient, size=entry.size,
                  arrived=entry.arrived, send_at=entry.send_at,
                  delay=round(max(now - due, 0.0), 3), attempts=len(entry.attempts),
                  relay=relay, reply=reply)


def encode(record: Record) -> bytes:
    """One journal line. The key order is fixed: relay.history_query searches the bytes."""
    return _encode({
        "at": round(record.at, 3), "status": record.status, "id": record.id,
        "message_id": record.message_id, "from": record.sender, "to": record.recipient,
        "size": record.size, "arrived": round(record.arrived, 3), "send_at": record.send_at,
        "delay": record.delay, "attempts": record.attempts, "relay": record.relay,
        "reply": record.reply,
    }).encode() + b"\n"


def decode(line: bytes) -> Record | None:
    """The record on a journal line; None for a line that is not one (torn, or foreign)."""
    try:
        data: Any = json.loads(line)
        return Record(at=float(data["at"]), status=str(data["status"]), id=str(data["id"]),
                      message_id=_text(data["message_id"]), sender=str(data["from"]),
                      recipient=str(data["to"]), size=int(data["size"]),
                      arrived=float(data["arrived"]), send_at=_number(data["send_at"]),
                      delay=float(data["delay"]), attempts=int(data["attempts"]),
                      relay=_text(data["relay"]), reply=_text(data["reply"]))
    except (ValueError, KeyError, TypeError):
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def day_of(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def journal_dir(spool_path: Path) -> Path:
    return Path(spool_path) / "history"


class Journal:
    """Appends records to the day files of a history directory; blocking, one writer
    thread at a time. Readers never need it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._day = ""
        self._fd: int | None = None
        self._torn = False  # a write failed part-way: the next one starts a new line

    def append(self, records: Iterable[Record]) -> None:
        """Write the records, one write per day file. Raises OSError (the caller decides
        whether history matters more than going on)."""
        by_day: dict[str, list[bytes]] = {}
        for record in records:
            by_day.setdefault(day_of(record.at), []).append(encode(record))
        for day, lines in by_day.items():
            fd = self._file(day)
            data = b"".join(lines)
            if self._torn:
                data = b"\n" + data
            self._torn = True
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._torn = False

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """fsync and close the open day file."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def prune(self, keep: float, now: float) -> int:
        """Delete day files wholly older than `keep` seconds; return how many went."""
        oldest = day_of(now - keep)
        removed = 0
        for name in os.listdir(self.directory):
            match = FILE_NAME.match(name)
            if match and match.group(1) < oldest:
                try:
                    os.unlink(self.directory / name)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    def _file(self, day: str) -> int:
        if day == self._day and self._fd is not None:
            return self._fd
        self.close()
        self.directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.directory / f"{day}.jsonl", OPEN_APPEND, 0o600)
        size = os.fstat(fd).st_size
        # A line torn by a crash would swallow the next record: end it first (readers
        # skip it as the unparsable line it is).
        self._torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        self._fd, self._day = fd, day
        return fd


class HistoryWriter:
    """The daemon's journal writer: a thread that turns attempts into records and writes
    them, so that delivery only hands over what it already has."""

    def __init__(self, directory: Path, keep: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.keep = keep
        self._journal = Journal(directory)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: list[Callable[[], list[Record]]] = []
        self._closing = False
        self._pruned_day = ""
        self._failing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="history", daemon=True)
        self._thread.start()

    def attempt(self, before: Entry, after: Entry, now: float) -> None:
        """An attempt changed `before` into `after` at `now`: record what it settled.
        Called on the event loop; costs a list append and a wakeup."""
        self._hand_over(lambda: outcomes(before, after, now))

    def record(self, records: list[Record]) -> None:
        self._hand_over(lambda: records)

    def close(self) -> None:
        """Write what is pending, fsync, and stop the thread (blocks: call in a thread)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _hand_over(self, work: Callable[[], list[Record]]) -> None:
        with self._cond:
            self._pending.append(work)
            if len(self._pending) == 1:
                self._cond.notify()

    def _run(self) -> None:
        unsynced_since: float | None = None
        while True:
            now = self._clock()
            if day_of(now) != self._pruned_day:
                self._prune(now)  # at start, and once a day
            with self._cond:
                # Idle, it still wakes at the day's end: old day files go then, not at the
                # next delivery.
                timeout = self._until_next_day(now) if unsynced_since is None else \
                    max(0.0, unsynced_since + SYNC_EVERY - time.monotonic())
                self._cond.wait_for(lambda: bool(self._pending or self._closing), timeout)
                batch, self._pending = self._pending, []
                closing = self._closing
            if batch:
                self._write([record for work in batch for record in work()])
                if unsynced_since is None:
                    unsynced_since = time.monotonic()
            if unsynced_since is not None and \
                    (closing or time.monotonic() - unsynced_since >= SYNC_EVERY):
                self._guard(self._journal.sync)
                unsynced_since = None
            if closing and not batch:
                self._guard(self._journal.close)
                return

    def _until_next_day(self, now: float) -> float:
        """Seconds from `now` until the next UTC day begins, a second late, and at most an
        hour (the clock may be set meanwhile)."""
        return min(DAY - now % DAY + 1.0, PRUNE_CHECK)

    def _write(self, records: list[Record]) -> None:
        if records:
            self._guard(lambda: self._journal.append(records))

    def _prune(self, now: float) -> None:
        self._pruned_day = day_of(now)
        self._guard(lambda: self._journal.prune(self.keep, now))

    def _guard(self, step: Callable[[], object]) -> None:
        """History is worth less than going on: a failure is logged once until it clears."""
        try:
            step()
        except OSError as exc:
            if not self._failing:
                logger.error("delivery history not written: %s", exc.strerror or exc)
            self._failing = True
        else:
            self._failing = False

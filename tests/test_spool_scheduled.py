"""Scheduled entries in the spool: stored straight into scheduled/ with their send time as
mtime, due then and not before, found again after a restart, moved by operators."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest

from relay import admin
from relay.admin import Action
from relay.entry import Entry, NewEntry, Queue, Status
from relay.errors import SpoolError
from relay.spool import Spool, new_id

CONTENT = b"Subject: later\r\n\r\nbody\r\n"


def new(send_at: float | None = None, message_id: str | None = "<m@ex.example>") -> NewEntry:
    return NewEntry(new_id(time.time()), "app@example.com", ("u@example.com",), (CONTENT,),
                    time.time(), False, send_at=send_at, message_id=message_id)


def put(spool: Spool, send_at: float | None) -> Entry:
    """Store one entry (scheduled if `send_at`) and return it."""
    [entry] = spool.store_many([new(send_at)])
    assert not isinstance(entry, Exception)
    return entry


def test_an_entry_with_a_send_time_is_published_into_scheduled_with_it_as_mtime(
        spool: Spool) -> None:
    """scheduled/ID, mtime = send_at; the envelope keeps the send time and the Message-ID."""
    send_at = time.time() + 3600
    entry = put(spool, send_at)
    assert entry.queue is Queue.SCHEDULED and entry.send_at == send_at
    path = spool.path / "scheduled" / entry.id
    assert path.stat().st_mtime == pytest.approx(send_at, abs=1e-6)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = spool.find(entry.id)
    assert (loaded.queue, loaded.send_at, loaded.message_id) == (
        Queue.SCHEDULED, send_at, "<m@ex.example>")
    assert os.listdir(spool.path / "incoming") == []


def test_a_send_time_that_cannot_be_set_fails_the_store_alone_and_closes_its_file_once(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """utime fails: SpoolError with its own reason (not a second close's EBADF), nothing
    left in tmp/, and the next store is published."""
    real_utime = os.utime

    def failing_utime(path: object, times: object = None) -> None:
        if isinstance(path, int):
            raise OSError(errno.EIO, "Input/output error")
        real_utime(path, times)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "utime", failing_utime)
    [result] = spool.store_many([new(time.time() + 3600)])
    assert isinstance(result, SpoolError) and "Input/output error" in str(result)
    assert os.listdir(spool.path / "tmp") == []
    monkeypatch.setattr(os, "utime", real_utime)
    assert put(spool, None).queue is Queue.INCOMING


def test_a_scheduled_store_sets_the_time_before_the_fsync_and_fsyncs_its_directory(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """write, mtime, fsync(file), rename into scheduled/, fsync(scheduled/): the send time
    is durable with the content, and the name with the directory."""
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    send_at = time.time() + 600

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            calls.append(f"fsync({os.readlink(f'/proc/self/fd/{fd}').rsplit('/', 1)[1]})")
        else:
            calls.append("fsync(file, mtime set)" if info.st_mtime == pytest.approx(send_at)
                         else "fsync(file)")
        real_fsync(fd)

    def rename(src: object, dst: object) -> None:
        calls.append(f"rename to {Path(str(dst)).parent.name}/")
        real_rename(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    spool.store_many([new(send_at)])
    assert calls == ["fsync(file, mtime set)", "rename to scheduled/", "fsync(scheduled)"]


def test_a_batch_of_both_kinds_fsyncs_each_directory_once(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two due now, two scheduled, one batch: incoming/ and scheduled/ fsynced once each."""
    directories: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            directories.append(os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1])
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    later = time.time() + 600
    results = spool.store_many([new(), new(later), new(), new(later)])
    assert [getattr(r, "queue", r) for r in results] == [Queue.INCOMING, Queue.SCHEDULED] * 2
    assert sorted(directories) == ["incoming", "scheduled"]


def test_a_scheduled_entry_is_not_claimed_before_its_time(spool: Spool) -> None:
    """claim() leaves it in scheduled/ until its mtime, and says when that is."""
    send_at = time.time() + 3600
    entry = put(spool, send_at)
    assert spool.claim(entry.id, send_at - 1) is None
    assert spool.waiting_until(entry.id) == pytest.approx(send_at)
    claimed = spool.claim(entry.id, send_at + 1)
    assert claimed is not None and claimed.queue is Queue.ACTIVE and claimed.send_at == send_at


def test_the_schedule_survives_a_restart(spool: Spool) -> None:
    """A fresh Spool over the same directory (a restart, or after SIGKILL) finds every
    scheduled entry at its time, from the directory alone."""
    times = [time.time() + 60 * n for n in (1, 2, 3)]
    stored = spool.store_many([new(t) for t in times])
    again = Spool(spool.path)
    due = dict(again.recover())
    for entry, when in zip(stored, times, strict=True):
        assert isinstance(entry, Entry) and due[entry.id] == pytest.approx(when)


def test_max_age_counts_from_the_send_time(spool: Spool) -> None:
    """An entry scheduled an hour ahead ages from then, not from its arrival."""
    entry = put(spool, time.time() + 3600)
    assert entry.age_from == entry.send_at


def test_reschedule_moves_the_time_records_it_and_wakes_the_daemon(spool: Spool) -> None:
    """A later time: mtime and state record follow, and wake/ names the entry once."""
    entry = put(spool, time.time() + 3600)
    later = time.time() + 7200
    moved = spool.reschedule(entry.id, (Queue.SCHEDULED,), later, time.time())
    assert moved is not None and moved.queue is Queue.SCHEDULED
    assert (spool.path / "scheduled" / entry.id).stat().st_mtime == pytest.approx(later)
    assert spool.find(entry.id).send_at == later
    assert spool.take_wakes() == [(entry.id, pytest.approx(later))]
    assert spool.take_wakes() == []
    assert os.listdir(spool.path / "hold") == []


def test_reschedule_of_a_deferred_entry_keeps_its_recipients(spool: Spool) -> None:
    """A deferred entry with one recipient sent goes to scheduled/; the sent one stays sent."""
    stored = spool.store(new_id(time.time()), "a@example.com",
                         ["x@example.com", "y@example.com"], [CONTENT], time.time(), False)
    claimed = spool.claim(stored.id, time.time())
    assert claimed is not None
    sent = (replace(claimed.recipients[0], status=Status.SENT, reply="250 ok"),
            claimed.recipients[1])
    spool.defer(replace(claimed, recipients=sent, next_attempt=time.time() + 60))
    moved = spool.reschedule(stored.id, (Queue.SCHEDULED, Queue.DEFERRED), time.time() + 600,
                             time.time())
    assert moved is not None and moved.queue is Queue.SCHEDULED
    assert [r.status for r in spool.find(stored.id).recipients] == [Status.SENT, Status.PENDING]


def test_reschedule_to_a_past_time_makes_the_entry_due_now(spool: Spool) -> None:
    """A time already past puts the entry in incoming/, its send time now, and wakes nobody."""
    entry = put(spool, time.time() + 3600)
    now = time.time()
    moved = spool.reschedule(entry.id, (Queue.SCHEDULED,), now - 10, now)
    assert moved is not None and moved.queue is Queue.INCOMING and moved.send_at == now
    assert spool.take_wakes() == []


def test_release_sends_a_scheduled_entry_now_and_restarts_its_age(spool: Spool) -> None:
    """release: scheduled/ to incoming/, and the send time max_age counts from becomes now."""
    entry = put(spool, time.time() + 3600)
    before = time.time()
    outcome = admin.apply(spool, Action.RELEASE, entry.id)
    assert outcome.message == "released"
    released = spool.find(entry.id)
    assert released.queue is Queue.INCOMING
    assert released.send_at is not None and before <= released.send_at <= time.time()
    state = json.loads((spool.path / "state" / entry.id).read_text())
    assert state["send_at"] == released.send_at


def test_reschedule_of_an_entry_in_none_of_its_sources_says_where_it_is(spool: Spool) -> None:
    """A failed entry is not rescheduled; the operator is told its state."""
    entry = put(spool, None)
    spool.move(entry.id, (Queue.INCOMING,), Queue.FAILED)
    outcome = admin.apply(spool, Action.RESCHEDULE, entry.id, send_at=time.time() + 60)
    assert outcome.message == "not rescheduled: message is failed"


def test_delete_returns_the_entry_as_it_was(spool: Spool) -> None:
    """Deleted from scheduled/, the entry comes back with its queue and recipients."""
    entry = put(spool, time.time() + 3600)
    deleted = spool.delete(entry.id)
    assert deleted is not None and deleted.queue is Queue.SCHEDULED
    assert [r.address for r in deleted.pending] == ["u@example.com"]
    assert all(os.listdir(spool.path / d) == [] for d in ("scheduled", "hold", "state"))

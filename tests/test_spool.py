"""The spool on a real filesystem: durability order, recovery, corruption, permissions."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.spool.ingest
from relay.entry import Entry, NewEntry, Queue, Status
from relay.errors import CorruptEntry, SpoolError, SpoolFull, SpoolLocked
from relay.spool import HEADER_READ, Spool, new_id

CONTENT = b"Subject: test\r\n\r\nbody\r\n"


def store(spool: Spool, recipients: tuple[str, ...] = ("a@example.com",)) -> str:
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", list(recipients), [b"Received: x\r\n", CONTENT],
                time.time(), False)
    return entry_id


def test_store_publishes_a_private_file_with_envelope_and_content(spool: Spool) -> None:
    """A stored entry is in incoming/, mode 0600, in 0700 directories, content intact."""
    entry_id = store(spool)
    path = spool.path / "incoming" / entry_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in ("", "tmp", "incoming", "state", "failed"):
        assert stat.S_IMODE((spool.path / directory).stat().st_mode) == 0o700
    entry = spool.find(entry_id)
    assert entry.sender == "s@example.com" and entry.queue is Queue.INCOMING
    assert spool.content(entry) == b"Received: x\r\n" + CONTENT
    assert os.listdir(spool.path / "tmp") == []


def test_the_envelope_as_received_is_kept_beside_the_rewritten_one(spool: Spool) -> None:
    """Address rules' originals are written only when they differ, and read back; an
    entry without them (as every entry before the rules) reads as unrewritten."""
    rewritten = NewEntry(new_id(time.time()), "noreply@mg.example.com", ("ops@example.com",),
                         (CONTENT,), time.time(), False, original_sender="root",
                         original_recipients=("root",))
    plain = replace(rewritten, id=new_id(time.time() + 1), original_sender=None,
                    original_recipients=None)
    results = spool.store_many([rewritten, plain])
    assert all(isinstance(result, Entry) for result in results)
    entry = spool.find(rewritten.id)
    assert (entry.original_sender, entry.original_recipients) == ("root", ("root",))
    assert results[0] == entry
    envelope = (spool.path / "incoming" / plain.id).read_bytes().split(b"\n")[1]
    assert b"original" not in envelope
    assert spool.find(plain.id).original_sender is None
    assert spool.find(plain.id).original_recipients is None


@pytest.mark.plan(33)
def test_store_fsyncs_file_then_renames_then_fsyncs_directory(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """write -> fsync(file) -> rename -> fsync(dir): two fsyncs per message, in that order."""
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        calls.append("fsync(dir)" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync(file)")
        real_fsync(fd)

    def rename(src: object, dst: object) -> None:
        calls.append("rename")
        real_rename(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    store(spool)
    assert calls == ["fsync(file)", "rename", "fsync(dir)"]


@pytest.mark.plan(33)
def test_concurrent_stores_share_directory_fsyncs_and_each_rename_is_covered(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: 16 stores at once need fewer directory fsyncs than stores, and every
    store returns only after a directory fsync that began after its own rename."""
    events: list[tuple[str, str]] = []  # ("rename", id) / ("dir-fsync-start", "")
    lock = threading.Lock()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            with lock:
                events.append(("dir-fsync-start", ""))
            time.sleep(0.01)  # a slow disk, so that callers pile up behind one fsync
        real_fsync(fd)

    def rename(src: object, dst: object) -> None:
        real_rename(src, dst)
        with lock:
            events.append(("rename", os.path.basename(str(dst))))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    returned: dict[str, int] = {}  # id -> how many events had happened when store returned

    def one() -> None:
        entry_id = store(spool)
        with lock:
            returned[entry_id] = len(events)
    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    syncs = sum(1 for kind, _ in events if kind == "dir-fsync-start")
    assert len(returned) == 16 and syncs < 16
    for entry_id, horizon in returned.items():
        renamed_at = events.index(("rename", entry_id))
        assert ("dir-fsync-start", "") in events[renamed_at:horizon], entry_id


@pytest.mark.plan(38)
def test_failed_directory_fsync_fails_every_store_it_covered(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SpoolError):
        store(spool)
    with pytest.raises(SpoolError):
        store(spool)  # a later store gets its own fsync, which fails again
    assert os.listdir(spool.path / "incoming") == [] and os.listdir(spool.path / "tmp") == []


@pytest.mark.plan(36, 38)
@pytest.mark.parametrize("error, expected", [(errno.EIO, SpoolError), (errno.ENOSPC, SpoolFull)])
def test_failed_fsync_or_full_disk_leaves_nothing_behind(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, error: int, expected: type) -> None:
    """An fsync error or ENOSPC refuses the message and leaves no file anywhere."""
    def failing_fsync(fd: int) -> None:
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(expected):
        store(spool)
    assert os.listdir(spool.path / "tmp") == [] and os.listdir(spool.path / "incoming") == []


@pytest.mark.plan(30)
def test_min_free_refuses_before_writing(tmp_path: Path) -> None:
    """Free space below spool.min_free: SpoolFull, nothing written."""
    spool = Spool(tmp_path / "spool", min_free=1 << 62)
    spool.open()
    with pytest.raises(SpoolFull):
        store(spool)
    assert os.listdir(spool.path / "incoming") == []


@pytest.mark.plan(97)
def test_symlink_at_the_temporary_name_is_not_followed(spool: Spool, tmp_path: Path) -> None:
    """A symlink planted where the temp file goes is refused; its target is untouched."""
    target = tmp_path / "victim"
    target.write_text("precious")
    entry_id = new_id(time.time())
    os.symlink(target, spool.path / "tmp" / entry_id)
    with pytest.raises(SpoolError):
        spool.store(entry_id, "s@example.com", ["a@example.com"], [CONTENT], time.time(), False)
    assert target.read_text() == "precious"


@pytest.mark.plan(97)
def test_symlinked_spool_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "spool")
    with pytest.raises(SpoolError, match="symbolic link"):
        Spool(tmp_path / "spool").open()


@pytest.mark.plan(42)
def test_second_lock_is_refused(spool: Spool) -> None:
    """Only one relay may serve a spool."""
    spool.lock()
    other = Spool(spool.path)
    with pytest.raises(SpoolLocked):
        other.lock()
    spool.unlock()
    other.lock()
    other.unlock()


@pytest.mark.plan(44)
def test_claim_defer_and_recover_keep_per_recipient_state(spool: Spool) -> None:
    """Recipient status and attempts survive defer and recovery; a second claim gets None."""
    from relay.entry import Attempt
    entry_id = store(spool, ("a@example.com", "b@example.com"))
    entry = spool.claim(entry_id, time.time())
    assert entry is not None and entry.queue is Queue.ACTIVE
    assert spool.claim(entry_id, time.time()) is None
    sent_one = replace(
        entry,
        recipients=(replace(entry.recipients[0], status=Status.SENT, reply="250 ok"),
                    replace(entry.recipients[1], reply="451 later")),
        attempts=(Attempt(1.0, "up:587", "451 later", 0.2),),
        next_attempt=time.time() + 100, last_error="451 later")
    spool.defer(sent_one)
    due = dict(spool.recover())
    assert abs(due[entry_id] - sent_one.next_attempt) < 1
    again = spool.find(entry_id)
    assert again.queue is Queue.DEFERRED
    assert [r.status for r in again.recipients] == [Status.SENT, Status.PENDING]
    assert again.attempts == sent_one.attempts and again.last_error == "451 later"


def test_deferred_entry_is_not_claimed_before_it_is_due(spool: Spool) -> None:
    """A deferred entry whose next attempt is in the future cannot be claimed yet."""
    entry_id = store(spool)
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    spool.defer(replace(entry, next_attempt=time.time() + 3600))
    assert spool.claim(entry_id, time.time()) is None
    assert spool.claim(entry_id, time.time() + 3601) is not None


def deferred_for_an_hour(spool: Spool) -> Path:
    entry = spool.claim(store(spool), time.time())
    assert entry is not None
    spool.defer(replace(entry, attempts=(), next_attempt=time.time() + 3600))
    return spool.path / "deferred" / entry.id


def test_reading_a_deferred_entry_leaves_its_access_time(spool: Spool) -> None:
    """Its mtime (the next attempt) is ahead of its atime, so under relatime any plain
    read would write a new atime: listing, loading and reading the content do not."""
    path = deferred_for_an_hour(spool)
    before = os.stat(path).st_atime_ns
    assert [e.id for e in spool.entries()] == [path.name]
    entry = spool.find(path.name)
    assert spool.content(entry).endswith(CONTENT)
    assert os.stat(path).st_atime_ns == before
    path.read_bytes()
    if os.stat(path).st_atime_ns == before:
        pytest.skip("this filesystem does not update access times (noatime)")


def test_a_spool_file_of_another_owner_is_read_all_the_same(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """O_NOATIME is refused (EPERM) for a file the reader does not own: it is read
    without it."""
    path = deferred_for_an_hour(spool)
    real_open = os.open

    def owner_only(file: str | Path, flags: int, *args: int) -> int:
        if flags & os.O_NOATIME:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_open(file, flags, *args)
    monkeypatch.setattr(os, "open", owner_only)
    entry = spool.find(path.name)
    assert spool.content(entry).endswith(CONTENT)


def test_unclaim_defers_an_interrupted_entry_untouched(spool: Spool) -> None:
    """An attempt cut short gives the entry back deferred until `due`, state unchanged."""
    entry_id = store(spool, ("a@example.com", "b@example.com"))
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    due = time.time() + 60
    spool.unclaim(entry, due)
    assert os.listdir(spool.path / "deferred") == [entry_id]
    assert spool.claim(entry_id, time.time()) is None
    assert spool.find(entry_id).attempts == ()
    spool.unclaim(entry, due)  # no longer in active/: nothing happens


@pytest.mark.plan(39)
def test_recover_sweeps_tmp_and_returns_active_to_incoming(spool: Spool) -> None:
    """After a crash: tmp/ debris goes, active/ entries are due again, orphan state goes."""
    entry_id = store(spool)
    assert spool.claim(entry_id, time.time()) is not None
    (spool.path / "tmp" / new_id(time.time())).write_bytes(b"half a message")
    (spool.path / "tmp" / f"{entry_id}.state.0badf00d").write_text("{")
    (spool.path / "tmp" / "upstreams.json.0badf00d").write_text("{")
    (spool.path / "state" / "0000000000000DEADBEEF").write_text("{}")
    due = spool.recover()
    assert due == [(entry_id, 0.0)]
    assert os.listdir(spool.path / "tmp") == []
    assert os.listdir(spool.path / "state") == []
    assert os.listdir(spool.path / "incoming") == [entry_id]


def test_remove_deletes_entry_and_state(spool: Spool) -> None:
    entry_id = store(spool)
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    spool.defer(replace(entry, next_attempt=time.time()))
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    spool.remove(entry)
    assert os.listdir(spool.path / "active") == [] and os.listdir(spool.path / "state") == []


def delivered(spool: Spool, content: bytes) -> str:
    """Store an entry with `content`, claim it and remove it, as a delivery does."""
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", ["r@example.net"], [content], time.time(), False)
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    spool.remove(entry)
    return entry_id


@pytest.mark.parametrize("old_size", [20_000, 10])
def test_the_next_store_writes_over_a_removed_entrys_file(spool: Spool, old_size: int) -> None:
    """A delivered entry's file is kept in tmp/, and the next entry is written into it
    (the same inode): with exactly its own content, whether the old one was longer or
    shorter."""
    old = delivered(spool, b"Subject: old\r\n\r\n" + b"o" * old_size)
    [spare] = os.listdir(spool.path / "tmp")
    assert spare == f"{old}.spare"
    inode = (spool.path / "tmp" / spare).stat().st_ino
    entry_id = store(spool)
    assert os.listdir(spool.path / "tmp") == []
    path = spool.path / "incoming" / entry_id
    assert path.stat().st_ino == inode
    assert spool.content(spool.find(entry_id)) == b"Received: x\r\n" + CONTENT
    assert b"ooo" not in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_emptying_the_spares_leaves_no_delivered_mail(spool: Spool) -> None:
    """empty_spares() empties every kept file; the next store still takes one."""
    claimed = [spool.claim(store(spool), time.time()) for _ in range(2)]
    for entry in claimed:
        assert entry is not None
        spool.remove(entry)
    assert spool.spares_hold_mail
    spool.empty_spares()
    spares = os.listdir(spool.path / "tmp")
    assert len(spares) == 2 and not spool.spares_hold_mail
    assert all((spool.path / "tmp" / name).stat().st_size == 0 for name in spares)
    inodes = {(spool.path / "tmp" / name).stat().st_ino for name in spares}
    entry_id = store(spool)
    assert (spool.path / "incoming" / entry_id).stat().st_ino in inodes
    assert spool.content(spool.find(entry_id)) == b"Received: x\r\n" + CONTENT


def test_only_so_many_emptied_files_are_kept(spool: Spool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SPARES, a delivered entry's file is unlinked."""
    monkeypatch.setattr(relay.spool.ingest, "SPARES", 2)
    claimed = [spool.claim(store(spool), time.time()) for _ in range(3)]
    for entry in claimed:
        assert entry is not None
        spool.remove(entry)
    assert len(os.listdir(spool.path / "tmp")) == 2
    assert os.listdir(spool.path / "active") == []


def test_emptied_files_swept_from_tmp_are_not_missed(spool: Spool) -> None:
    """recover() (or an operator) empties tmp/ of the kept files: the next store creates
    a file of its own."""
    delivered(spool, CONTENT)
    spool.recover()
    assert os.listdir(spool.path / "tmp") == []
    entry_id = store(spool)
    assert spool.content(spool.find(entry_id)) == b"Received: x\r\n" + CONTENT


@pytest.mark.plan(41, 67)
@pytest.mark.parametrize("name, data", [
    ("garbage", b"\x00\xffnot an entry at all"),
    ("empty", b""),
    ("truncated-envelope", b"RELAY-ENTRY 1\n{\"id\": \"x\""),
    ("bad-json", b"RELAY-ENTRY 1\n{nope}\nbody"),
    ("size-mismatch", None),
    ("missing-keys", b"RELAY-ENTRY 1\n{}\n"),
    ("crlf-in-address", b"unsafe"),
])
def test_corrupt_entry_is_moved_aside_on_claim(spool: Spool, name: str, data: bytes | None) -> None:
    """An unparsable entry raises CorruptEntry and lands in corrupt/, never crashing."""
    entry_id = store(spool)
    path = spool.path / "incoming" / entry_id
    if data is None:
        data = path.read_bytes()[:-5]  # cut off the end of the content
    elif data == b"unsafe":  # a well-formed file whose recipient smuggles a command
        data = path.read_bytes().replace(b"a@example.com",
                                         b"a@example.com>\\r\\nRCPT TO:<b@example.com")
    path.write_bytes(data)
    with pytest.raises(CorruptEntry):
        spool.claim(entry_id, time.time())
    assert os.listdir(spool.path / "corrupt") == [entry_id]


@pytest.mark.plan(41)
@pytest.mark.parametrize("change, reason", [
    ({"recipients": "a@example.com"}, "sender or recipients malformed"),
    ({"recipients": []}, "sender or recipients malformed"),
    ({"recipients": ["a@example.com", 7]}, "sender or recipients malformed"),
    ({"recipients": ["a@example.com", ""]}, "sender or recipients malformed"),
    ({"sender": None}, "sender or recipients malformed"),
    ({"sender": "s@example.com\r\nRSET"}, "control characters"),
    ({"arrived": "yesterday"}, "arrival time"),
    ({"original_sender": ["root"]}, "original sender or recipients malformed"),
    ({"original_recipients": "root"}, "original sender or recipients malformed"),
    ({"original_recipients": ["root", None]}, "original sender or recipients malformed"),
])
def test_an_envelope_of_the_wrong_shape_is_corrupt(spool: Spool, change: dict[str, object],
                                                   reason: str) -> None:
    """Each envelope field is checked for its type and shape, and the reason is named."""
    entry_id = store(spool)
    path = spool.path / "incoming" / entry_id
    magic, envelope, content = path.read_bytes().split(b"\n", 2)
    envelope = json.dumps({**json.loads(envelope), **change}).encode()
    path.write_bytes(b"\n".join((magic, envelope, content)))
    with pytest.raises(CorruptEntry, match=reason):
        spool.load(Queue.INCOMING, entry_id)


@pytest.mark.plan(41)
def test_an_envelope_that_is_not_utf8_is_corrupt(spool: Spool) -> None:
    """The spool writes envelopes as UTF-8 only; other bytes are unreadable, not guessed."""
    entry_id = store(spool)
    path = spool.path / "incoming" / entry_id
    path.write_bytes(path.read_bytes().replace(b"s@example.com", b"s\xff@example.com"))
    with pytest.raises(CorruptEntry, match="unreadable envelope"):
        spool.load(Queue.INCOMING, entry_id)


@pytest.mark.plan(41)
@pytest.mark.parametrize("size", [HEADER_READ // 2, HEADER_READ - 200, HEADER_READ * 3])
def test_a_truncated_entry_is_corrupt_whether_its_first_read_holds_it_all(
        spool: Spool, size: int) -> None:
    """The content length is checked against the envelope both when one read holds the
    whole file and when it does not (then the size comes from fstat)."""
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", ["a@example.com"], [b"x" * size], time.time(), False)
    path = spool.path / "incoming" / entry_id
    assert spool.load(Queue.INCOMING, entry_id).size == size
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptEntry, match="envelope says"):
        spool.load(Queue.INCOMING, entry_id)


def test_an_envelope_longer_than_the_first_read_is_read_on(spool: Spool) -> None:
    """Enough recipients to fill several first reads: load and content read on to the
    envelope's end and find every recipient and the content after it."""
    recipients = [f"recipient-{n:05}@example.com" for n in range(2000)]
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", recipients, [CONTENT], time.time(), False)
    entry = spool.load(Queue.INCOMING, entry_id)
    assert [r.address for r in entry.recipients] == recipients
    assert spool.content(entry) == CONTENT


def test_a_long_envelope_cut_short_is_truncated(spool: Spool) -> None:
    """A file that ends inside an envelope longer than the first read is corrupt."""
    recipients = [f"recipient-{n:05}@example.com" for n in range(2000)]
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", recipients, [CONTENT], time.time(), False)
    path = spool.path / "incoming" / entry_id
    path.write_bytes(path.read_bytes()[:HEADER_READ * 3])
    with pytest.raises(CorruptEntry, match="truncated envelope"):
        spool.load(Queue.INCOMING, entry_id)


@pytest.mark.plan(41)
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_corrupt_entry(tmp_path_factory: pytest.TempPathFactory,
                                                data: bytes) -> None:
    """Fuzz: whatever bytes are in a queue file, load() parses them or raises CorruptEntry."""
    spool = Spool(tmp_path_factory.mktemp("fuzz") / "spool")
    spool.open()
    entry_id = new_id(time.time())
    (spool.path / "incoming" / entry_id).write_bytes(b"RELAY-ENTRY 1\n" + data)
    with contextlib.suppress(CorruptEntry):
        spool.load(Queue.INCOMING, entry_id)


def publish(spool: Spool, new: NewEntry) -> str:
    [result] = spool.store_many([new])
    assert not isinstance(result, Exception), result
    return result.id


@pytest.mark.parametrize("old_size", [0, 3_000_000, 10])
def test_a_draft_is_published_with_its_size_and_exact_content(spool: Spool,
                                                              old_size: int) -> None:
    """Content written to a draft as it arrives (into a new file, or over a delivered
    entry's longer or shorter one) is published like any entry, its size filled in."""
    if old_size:
        delivered(spool, b"Subject: old\r\n\r\n" + b"o" * old_size)
    entry_id = new_id(time.time())
    draft = spool.draft(NewEntry(entry_id, "s@example.com", ("r@example.net",), (), time.time(),
                                 False))
    pieces = [b"Received: x\r\n", b"Subject: big\r\n\r\n", b"b" * 1_000_000, b"\r\nend\r\n"]
    for piece in pieces:
        draft.write([piece])
    assert draft.size == sum(map(len, pieces))
    publish(spool, NewEntry(entry_id, "s@example.com", ("r@example.net",), (), time.time(),
                            False, draft=draft))
    entry = spool.find(entry_id)
    assert entry.size == draft.size and entry.recipients[0].address == "r@example.net"
    assert spool.content(entry) == b"".join(pieces)
    assert stat.S_IMODE((spool.path / "incoming" / entry_id).stat().st_mode) == 0o600
    assert [name for name in os.listdir(spool.path / "tmp") if not name.endswith(".spare")] == []


def test_a_discarded_draft_leaves_nothing(spool: Spool) -> None:
    entry_id = new_id(time.time())
    draft = spool.draft(NewEntry(entry_id, "s@example.com", ("r@example.net",), (), time.time(),
                                 False))
    draft.write([b"x" * 10_000])
    draft.discard()
    assert os.listdir(spool.path / "tmp") == []


def test_a_draft_that_fills_the_disk_is_refused_and_removed(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while content arrives: SpoolFull, and the draft's file is gone."""
    entry_id = new_id(time.time())
    draft = spool.draft(NewEntry(entry_id, "s@example.com", ("r@example.net",), (), time.time(),
                                 False))

    def full(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(SpoolFull):
        draft.write([b"x" * 10])
    draft.discard()
    assert os.listdir(spool.path / "tmp") == []


def test_failed_entry_keeps_the_id_of_its_notice(spool: Spool) -> None:
    """The notice's queue ID is written with the failure and read back, through a requeue."""
    entry_id = store(spool)
    entry = spool.claim(entry_id, time.time())
    assert entry is not None
    notice = new_id(time.time())
    failed = replace(entry, recipients=(replace(entry.recipients[0], status=Status.FAILED,
                                                reply="550 no"),), notice=notice)
    spool.fail(failed)
    assert spool.find(entry_id).notice == notice
    requeued = spool.requeue(entry_id, time.time())
    assert requeued is not None and spool.find(entry_id).notice == notice


def test_state_record_with_a_malformed_notice_is_corrupt(spool: Spool) -> None:
    """A notice that is not a queue ID (a hand-edited record) is refused, not trusted."""
    entry_id = store(spool)
    (spool.path / "state" / entry_id).write_text(json.dumps({
        "recipients": [{"status": "pending", "reply": None}], "attempts": [],
        "next_attempt": None, "last_error": None, "notice": "../../etc/passwd"}))
    with pytest.raises(CorruptEntry, match="notice is not a queue ID"):
        spool.find(entry_id)


def test_census_counts_queues_and_finds_the_oldest_waiting_entry(spool: Spool) -> None:
    """Counts per state; the oldest of queued, active and deferred by its ID, a held older
    one and a stray file not taken for it."""
    held = store(spool)
    spool.move(held, (Queue.INCOMING,), Queue.HOLD)
    waiting = store(spool)
    store(spool)
    (spool.path / "incoming" / "0-stray").write_text("")
    counts, oldest = spool.census()
    assert counts == {"queued": 3, "active": 0, "deferred": 0, "scheduled": 0, "held": 1,
                      "failed": 0}
    assert oldest == relay.spool.arrival_of(waiting)
    assert oldest is not None and abs(oldest - time.time()) < 60


def test_write_problem_names_free_space_below_min_free(spool: Spool) -> None:
    """Room for mail: None. min_free above the free space: the figures, for /healthz."""
    assert spool.write_problem() is None
    spool.min_free = spool.free_bytes() + 2**40
    problem = spool.write_problem()
    assert problem is not None and "bytes free, spool.min_free is" in problem

"""The delivery history: records from attempts and deletions, the journal's day files,
the writer thread, and every filter of the search over them."""

from __future__ import annotations

import calendar
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

import relay.history
from relay.entry import Attempt, Entry, Queue, Recipient, Status
from relay.history import HistoryWriter, Journal, Record, deletions, encode, outcomes
from relay.history_query import Query, search

T0 = calendar.timegm((2026, 12, 4, 12, 0, 0))
DAY = 86400


def record(n: int, **changes: object) -> Record:
    base = Record(at=T0 + n, status="sent", id=f"{n:021X}", message_id=f"<m{n}@app.example>",
                  sender="app@example.com", recipient=f"user{n}@example.net", size=1000 + n,
                  arrived=T0 + n - 1, send_at=None, delay=1.0, attempts=1,
                  relay="smtp.example.com:587", reply="250 2.0.0 Ok")
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """A history directory holding records 0-9 (record 3 failed, 4 expired, 5 deleted,
    6 from another sender), 7 and 8 a day later."""
    directory = tmp_path / "history"
    j = Journal(directory)
    j.append([record(0), record(1), record(2), record(3, status="failed", reply="550 no"),
              record(4, status="expired", reply="expired after 3 attempts: 451 busy"),
              record(5, status="deleted", relay=None, reply=None),
              record(6, sender="cron@Other.example"),
              record(7, at=T0 + DAY), record(8, at=T0 + DAY + 1, recipient="USER1@example.net")])
    j.close()
    return directory


def found(directory: Path, **query: object) -> list[str]:
    return [r.id[-1] for r in search(directory, Query(**query))]  # type: ignore[arg-type]


def entry(*recipients: Recipient, attempts: int = 1, send_at: float | None = None) -> Entry:
    return Entry(id="0" * 21, queue=Queue.ACTIVE, sender="app@example.com",
                 recipients=recipients, arrived=T0, size=500, message_id="<x@app.example>",
                 attempts=tuple(Attempt(T0 + n, "up.example:587", "r", 0.1)
                                for n in range(attempts)), send_at=send_at)


def test_an_attempt_records_each_recipient_it_settled_and_no_other() -> None:
    """Sent, failed and expired recipients each get a record; one still pending and one
    settled by an earlier attempt get none."""
    before = entry(Recipient("a@x.example"), Recipient("b@x.example"), Recipient("c@x.example"),
                   Recipient("d@x.example"), Recipient("e@x.example", Status.SENT, "250 old"),
                   attempts=2)
    after = replace(before, recipients=(
        Recipient("a@x.example", Status.SENT, "250 2.0.0 Ok <id1@mg.example>"),
        Recipient("b@x.example", Status.FAILED, "550 5.1.1 No such user"),
        Recipient("c@x.example", Status.FAILED, "expired after 3 attempts: 451 busy"),
        Recipient("d@x.example"), Recipient("e@x.example", Status.SENT, "250 old")),
        attempts=before.attempts + (Attempt(T0 + 100, "up.example:587", "r", 0.2),))
    records = outcomes(before, after, T0 + 101)
    assert [(r.recipient, r.status) for r in records] == [
        ("a@x.example", "sent"), ("b@x.example", "failed"), ("c@x.example", "expired")]
    first = records[0]
    assert (first.id, first.message_id, first.sender, first.size, first.arrived) == (
        "0" * 21, "<x@app.example>", "app@example.com", 500, T0)
    assert (first.at, first.delay, first.attempts, first.relay, first.reply) == (
        T0 + 101, 101.0, 3, "up.example:587", "250 2.0.0 Ok <id1@mg.example>")


def test_delay_of_a_scheduled_message_counts_from_its_send_time() -> None:
    """Sent half a second after its send time: a delay of 0.5 s, not an hour."""
    before = entry(Recipient("a@x.example"), send_at=T0 + 3600)
    after = replace(before, recipients=(Recipient("a@x.example", Status.SENT, "250 ok"),))
    [sent] = outcomes(before, after, T0 + 3600.5)
    assert (sent.delay, sent.send_at) == (0.5, T0 + 3600)


def test_a_deletion_records_the_recipients_not_yet_settled() -> None:
    """Deleted with one recipient sent: only the pending one is recorded, as deleted."""
    deleted = entry(Recipient("a@x.example", Status.SENT, "250 ok"),
                    Recipient("b@x.example", Status.PENDING, "451 busy"))
    [record_] = deletions(deleted, T0 + 50)
    assert (record_.recipient, record_.status, record_.reply) == ("b@x.example", "deleted",
                                                                  "451 busy")


def test_records_are_filed_under_the_utc_day_of_their_outcome(journal: Path) -> None:
    """One 0600 file per UTC day of the outcome."""
    assert sorted(os.listdir(journal)) == ["2026-12-04.jsonl", "2026-12-05.jsonl"]
    assert all(os.stat(journal / name).st_mode & 0o777 == 0o600 for name in os.listdir(journal))


def test_every_record_is_found_without_a_filter(journal: Path) -> None:
    """No filter: every record, day by day, in the order written."""
    assert found(journal) == list("012345678")


def test_filter_by_recipient_ignores_case_and_takes_a_domain(journal: Path) -> None:
    """--to matches the address in any case, or a whole @domain, never part of one."""
    assert found(journal, to="user1@example.net") == ["1", "8"]
    assert found(journal, to="User2@EXAMPLE.net") == ["2"]
    assert found(journal, to="@example.net") == list("012345678")
    assert found(journal, to="@xample.net") == []
    assert found(journal, to="nobody@example.net") == []


def test_filter_by_sender(journal: Path) -> None:
    """--from matches the envelope sender, or its domain."""
    assert found(journal, sender="cron@other.example") == ["6"]
    assert found(journal, sender="@other.example") == ["6"]


def test_filter_by_message_id_with_or_without_brackets(journal: Path) -> None:
    """--message-id matches with or without <>, in any case."""
    assert found(journal, message_id="<m3@app.example>") == ["3"]
    assert found(journal, message_id="M3@APP.example") == ["3"]


def test_filter_by_queue_id(journal: Path) -> None:
    """--id matches the queue ID, typed in either case."""
    assert found(journal, queue_id=f"{4:021X}") == ["4"]
    assert found(journal, queue_id=f"{4:021x}") == ["4"]


@pytest.mark.parametrize("status, ids", [("sent", ["0", "1", "2", "6", "7", "8"]),
                                         ("failed", ["3"]), ("expired", ["4"]),
                                         ("deleted", ["5"])])
def test_filter_by_status(journal: Path, status: str, ids: list[str]) -> None:
    """--status selects one outcome."""
    assert found(journal, status=status) == ids


def test_filter_by_time(journal: Path) -> None:
    """--since is inclusive, --until exclusive; whole days outside are never opened."""
    assert found(journal, since=T0 + 7) == ["7", "8"]
    assert found(journal, until=T0 + 2) == ["0", "1"]
    assert found(journal, since=T0 + 2, until=T0 + 4) == ["2", "3"]


def test_filters_combine(journal: Path) -> None:
    """Filters narrow each other down."""
    assert found(journal, to="user1@example.net", since=T0 + DAY) == ["8"]
    assert found(journal, to="@example.net", status="failed") == ["3"]


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_afresh(
        journal: Path) -> None:
    """A crash mid-write leaves half a line: readers skip it, and the next append ends it
    first, so the record after it is whole."""
    path = journal / "2026-12-05.jsonl"
    with open(path, "ab") as f:
        f.write(encode(record(9, at=T0 + DAY + 2))[:40])
    assert found(journal, since=T0 + DAY) == ["7", "8"]
    j = Journal(journal)
    j.append([record(10, at=T0 + DAY + 3)])
    j.close()
    assert found(journal, since=T0 + DAY) == ["7", "8", "A"]


def test_a_garbled_line_in_the_middle_is_skipped(journal: Path) -> None:
    """A line that is no record is passed over; the ones around it are found."""
    path = journal / "2026-12-04.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + b'{"at":1,"status":"sent"\n' + b"".join(lines[2:]))
    assert found(journal, until=T0 + DAY) == list("0123456")


def test_prune_deletes_only_days_older_than_keep(tmp_path: Path) -> None:
    """keep of two days: older day files go; newer ones and foreign files stay."""
    directory = tmp_path / "history"
    j = Journal(directory)
    j.append([record(n, at=T0 - n * DAY) for n in range(5)])
    j.close()
    (directory / "notes.txt").write_text("not ours")
    assert j.prune(keep=2 * DAY, now=T0) == 2
    assert sorted(os.listdir(directory)) == ["2026-12-02.jsonl", "2026-12-03.jsonl",
                                             "2026-12-04.jsonl", "notes.txt"]


def test_the_writer_thread_writes_what_it_is_handed_and_fsyncs_within_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """attempt() returns at once; the records reach the file, fsynced by the deadline."""
    synced = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.set()
    monkeypatch.setattr(os, "fsync", fsync)
    writer = HistoryWriter(tmp_path / "history", keep=30 * DAY)
    writer.start()
    before = entry(Recipient("a@x.example"))
    after = replace(before, recipients=(Recipient("a@x.example", Status.SENT, "250 ok"),))
    now = time.time()
    writer.attempt(before, after, now)
    assert synced.wait(relay.history.SYNC_EVERY + 5)
    assert [r.recipient for r in search(tmp_path / "history", Query())] == ["a@x.example"]
    writer.close()


def test_closing_the_writer_writes_what_is_pending(tmp_path: Path) -> None:
    """Records handed over just before close are on disk after it."""
    writer = HistoryWriter(tmp_path / "history", keep=30 * DAY)
    writer.start()
    writer.record([record(n, at=time.time()) for n in range(3)])
    writer.close()
    assert len(list(search(tmp_path / "history", Query()))) == 3


def test_the_writer_prunes_old_days_when_it_starts(tmp_path: Path) -> None:
    """A day file older than keep is deleted when the writer starts."""
    directory = tmp_path / "history"
    j = Journal(directory)
    j.append([record(0, at=time.time() - 40 * DAY)])
    j.close()
    writer = HistoryWriter(directory, keep=30 * DAY)
    writer.start()
    writer.close()
    assert os.listdir(directory) == []


def test_an_idle_writer_prunes_when_the_day_changes(tmp_path: Path) -> None:
    """No delivery at all: the day file that falls out of keep at midnight is deleted
    then, not left until the next record comes."""
    directory = tmp_path / "history"
    midnight = 100 * DAY
    j = Journal(directory)
    j.append([record(0, at=midnight - 31 * DAY)])  # kept until this midnight, then old
    j.close()
    now = [midnight - 0.5]
    writer = HistoryWriter(directory, keep=30 * DAY, clock=lambda: now[0])
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while not writer._pruned_day and time.monotonic() < deadline:
            time.sleep(0.01)  # the start-up prune, before midnight, keeps the file
        assert len(os.listdir(directory)) == 1
        now[0] = midnight + 1
        while os.listdir(directory) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(directory) == []
    finally:
        writer.close()


def test_a_failing_disk_costs_the_history_not_the_writer(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The journal cannot be written: one error logged, and the thread goes on."""
    (tmp_path / "history").write_text("a file where the directory should be")
    writer = HistoryWriter(tmp_path / "history", keep=30 * DAY)
    writer.start()
    writer.record([record(0, at=time.time())])
    writer.record([record(1, at=time.time())])
    writer.close()
    errors = [r for r in caplog.records if "delivery history not written" in r.getMessage()]
    assert len(errors) == 1

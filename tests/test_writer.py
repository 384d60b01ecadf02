"""The spool writer: batched durable stores, removals, and shutdown, on a real spool."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import relay.writer
from relay.entry import Entry, NewEntry, Queue
from relay.errors import SpoolError, SpoolFull, WriterStopped
from relay.spool import Spool, new_id
from relay.writer import SpoolWriter

CONTENT = b"Subject: test\r\n\r\nbody\r\n"


def new_entry(size: int = 0) -> NewEntry:
    return NewEntry(new_id(time.time()), "s@example.com", ("r@example.net",),
                    (b"Received: x\r\n", CONTENT + b"x" * size), time.time(), False)


def delivered_entry(spool: Spool) -> Entry:
    """An entry stored and claimed, ready for remove()."""
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", ["r@example.net"], [CONTENT], time.time(), False)
    active = spool.claim(entry_id, time.time())
    assert active is not None
    return active


def with_writer(spool: Spool, scenario: Callable[[SpoolWriter], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        writer = SpoolWriter(spool)
        writer.start()
        try:
            return await asyncio.wait_for(scenario(writer), 30)
        finally:
            await writer.close()
    return asyncio.run(main())


def slow_directory_fsyncs(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[float]:
    """Make each directory fsync take 50 ms (or fail with EIO); returns their start times."""
    started: list[float] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            started.append(time.monotonic())
            time.sleep(0.05)
            if fail:
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return started


def test_stores_waiting_together_share_one_directory_fsync(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve stores submitted while the writer is busy are published by fewer directory
    fsyncs than stores, and each returns an entry that is in incoming/ with its content."""
    syncs = slow_directory_fsyncs(monkeypatch)

    async def scenario(writer: SpoolWriter) -> list[Entry]:
        return await asyncio.gather(*(writer.store(new_entry()) for _ in range(12)))
    entries = with_writer(spool, scenario)
    assert len({e.id for e in entries}) == 12 and len(syncs) < 12
    for entry in entries:
        assert entry.queue is Queue.INCOMING
        assert spool.content(entry) == b"Received: x\r\n" + CONTENT
    assert os.listdir(spool.path / "tmp") == []


def test_a_store_resolves_only_after_the_directory_fsync_that_covers_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's result arrives after a directory fsync that began after its rename."""
    syncs = slow_directory_fsyncs(monkeypatch)
    real_rename = os.rename
    renamed: list[float] = []

    def rename(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        renamed.append(time.monotonic())
    monkeypatch.setattr(os, "rename", rename)

    async def scenario(writer: SpoolWriter) -> float:
        await writer.store(new_entry())
        return time.monotonic()
    resolved = with_writer(spool, scenario)
    assert len(renamed) == 1 and any(renamed[0] <= s and s + 0.05 <= resolved for s in syncs)


def test_a_store_that_does_not_fit_fails_alone(spool: Spool) -> None:
    """With room for a small message only, the large one in the same batch is refused
    with SpoolFull and leaves nothing behind; the small one is stored."""
    free = os.statvfs(spool.path)
    spool.min_free = free.f_bavail * free.f_frsize - 1_000_000

    async def scenario(writer: SpoolWriter) -> list[Any]:
        return await asyncio.gather(writer.store(new_entry()),
                                    writer.store(new_entry(size=2_000_000)),
                                    return_exceptions=True)
    small, large = with_writer(spool, scenario)
    assert isinstance(small, Entry) and isinstance(large, SpoolFull)
    assert os.listdir(spool.path / "incoming") == [small.id]
    assert os.listdir(spool.path / "tmp") == []


def test_a_failed_directory_fsync_fails_the_whole_batch_and_publishes_nothing(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from the directory fsync: every store it was to cover raises SpoolError and
    none of them stays in incoming/, so no client hears 250 for a name that may vanish."""
    slow_directory_fsyncs(monkeypatch, fail=True)

    async def scenario(writer: SpoolWriter) -> list[Any]:
        return await asyncio.gather(*(writer.store(new_entry()) for _ in range(4)),
                                    return_exceptions=True)
    results = with_writer(spool, scenario)
    assert all(isinstance(r, SpoolError) for r in results)
    assert os.listdir(spool.path / "incoming") == []


def test_disk_wait_returns_as_a_batch_begins_its_fsyncs(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter is woken while the store it waited for is still syncing; a second waiter,
    arriving during those fsyncs, returns at once."""
    slow_directory_fsyncs(monkeypatch)

    async def scenario(writer: SpoolWriter) -> tuple[bool, bool]:
        first = asyncio.ensure_future(writer.disk_wait(30))
        await asyncio.sleep(0)  # waiting
        store = asyncio.ensure_future(writer.store(new_entry()))
        await asyncio.wait_for(first, 10)
        woken_during_store = not store.done()
        await asyncio.wait_for(writer.disk_wait(30), 1)
        again_during_store = not store.done()
        await store
        return woken_during_store, again_during_store
    assert with_writer(spool, scenario) == (True, True)


def test_disk_wait_gives_up_after_its_bound_once_nothing_is_syncing(spool: Spool) -> None:
    """With no store at all, and again once the batch that woke a waiter has been
    settled, a wait lasts its bound."""
    async def scenario(writer: SpoolWriter) -> float:
        await asyncio.wait_for(writer.disk_wait(0.05), 5)
        waiting = asyncio.ensure_future(writer.disk_wait(30))
        await asyncio.sleep(0)  # waiting
        await writer.store(new_entry())
        await asyncio.wait_for(waiting, 1)
        started = time.monotonic()
        await asyncio.wait_for(writer.disk_wait(0.05), 5)
        return time.monotonic() - started
    assert with_writer(spool, scenario) >= 0.04


def test_a_removal_handed_over_during_a_batch_is_settled_with_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivered entry handed over while a batch is in its fsyncs is removed in that
    pass, and the batch's store is answered only with it, in one wakeup of the loop."""
    slow_directory_fsyncs(monkeypatch)
    entry_id = new_id(time.time())
    spool.store(entry_id, "s@example.com", ["r@example.net"], [CONTENT], time.time(), False)
    active = spool.claim(entry_id, time.time())
    assert active is not None
    removed: list[float] = []
    real_remove = spool.remove

    def slow_remove(entry: Entry) -> None:
        time.sleep(0.05)
        real_remove(entry)
        removed.append(time.monotonic())
    monkeypatch.setattr(spool, "remove", slow_remove)

    async def scenario(writer: SpoolWriter) -> float:
        waiting = asyncio.ensure_future(writer.disk_wait(30))
        await asyncio.sleep(0)  # waiting
        store = asyncio.ensure_future(writer.store(new_entry()))
        await asyncio.wait_for(waiting, 10)  # the batch is in its fsyncs
        removal = asyncio.ensure_future(writer.remove(active))
        await store
        stored = time.monotonic()
        await removal
        return stored
    stored = with_writer(spool, scenario)
    assert len(removed) == 1 and removed[0] <= stored
    assert os.listdir(spool.path / "active") == []


class LateLock(threading.Condition):
    """The writer's condition, where the loop's second acquire waits until the thread
    has taken the batch holding the first store: a store handed over just as its batch
    is taken."""

    def __init__(self, batch_taken: threading.Event) -> None:
        super().__init__()
        self.batch_taken = batch_taken
        self.loop_acquires = 0

    def __enter__(self) -> bool:
        if threading.current_thread() is threading.main_thread():
            self.loop_acquires += 1
            if self.loop_acquires == 2:
                self.batch_taken.wait(10)
        return super().__enter__()


def test_a_store_handed_over_as_a_batch_is_taken_is_answered(spool: Spool) -> None:
    """The second store reaches the writer's lock only after the thread has swapped out
    the list holding the first: it must go into the next batch and be answered."""
    batch_taken = threading.Event()

    async def main() -> list[Entry]:
        writer = SpoolWriter(spool)
        writer._work = LateLock(batch_taken)
        real_store_all = writer._store_all

        def store_all(batch: list[NewEntry]) -> list[Entry | Exception]:
            batch_taken.set()
            return real_store_all(batch)
        writer._store_all = store_all  # type: ignore[method-assign]
        writer.start()
        try:
            first = asyncio.ensure_future(writer.store(new_entry()))
            await asyncio.sleep(0)  # handed over
            second = asyncio.ensure_future(writer.store(new_entry()))
            return await asyncio.wait_for(asyncio.gather(first, second), 10)
        finally:
            await writer.close()
    stored = asyncio.run(main())
    assert sorted(os.listdir(spool.path / "incoming")) == sorted(e.id for e in stored)


def test_remove_deletes_the_entry_and_its_state_record(spool: Spool) -> None:
    """A delivered entry's file and state record are gone once remove() returns."""
    active = delivered_entry(spool)
    (spool.path / "state" / active.id).write_bytes(b"{}")

    async def scenario(writer: SpoolWriter) -> None:
        await writer.remove(active)
    with_writer(spool, scenario)
    assert os.listdir(spool.path / "active") == [] and os.listdir(spool.path / "state") == []


def spare_sizes(spool: Spool) -> list[int]:
    return [(spool.path / "tmp" / name).stat().st_size for name in os.listdir(spool.path / "tmp")]


def test_the_writer_empties_the_spares_once_idle(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removed entry's file is kept holding the message; after SPARES_LINGER without
    work the thread empties it."""
    monkeypatch.setattr(relay.writer, "SPARES_LINGER", 0.2)
    entry = delivered_entry(spool)

    async def scenario(writer: SpoolWriter) -> tuple[list[int], list[int]]:
        await writer.remove(entry)
        kept = spare_sizes(spool)
        deadline = time.monotonic() + 10
        while spare_sizes(spool) != [0] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return kept, spare_sizes(spool)
    kept, later = with_writer(spool, scenario)
    assert len(kept) == 1 and kept[0] > len(CONTENT)
    assert later == [0]


def test_the_writer_empties_the_spares_when_it_stops(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() leaves no delivered message in tmp/, however recent."""
    monkeypatch.setattr(relay.writer, "SPARES_LINGER", 3600)
    entry = delivered_entry(spool)

    async def scenario(writer: SpoolWriter) -> list[int]:
        await writer.remove(entry)
        return spare_sizes(spool)
    kept = with_writer(spool, scenario)
    assert len(kept) == 1 and kept[0] > len(CONTENT)
    assert spare_sizes(spool) == [0]


def test_close_finishes_what_was_submitted_then_refuses_more(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores submitted before close() complete; a store after it raises SpoolError."""
    slow_directory_fsyncs(monkeypatch)

    async def main() -> tuple[list[Entry], BaseException | None]:
        writer = SpoolWriter(spool)
        writer.start()
        pending = [asyncio.ensure_future(writer.store(new_entry())) for _ in range(3)]
        await asyncio.sleep(0)  # submitted
        await writer.close()
        stored = await asyncio.gather(*pending)
        try:
            await writer.store(new_entry())
        except SpoolError as exc:
            return stored, exc
        return stored, None
    stored, refused = asyncio.run(main())
    assert len(stored) == 3 and isinstance(refused, SpoolError)
    assert sorted(os.listdir(spool.path / "incoming")) == sorted(e.id for e in stored)
    assert not any(t.name == "spool-writer" for t in threading.enumerate())


@pytest.mark.plan(109)
def test_emptying_spares_on_a_read_only_disk_leaves_the_writer_serving(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS from emptying and from unlinking a kept file: the thread goes on, and the
    next store is answered."""
    monkeypatch.setattr(relay.writer, "SPARES_LINGER", 0.05)
    entry = delivered_entry(spool)
    real_truncate, real_unlink = os.truncate, os.unlink
    emptied = threading.Event()

    def read_only(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any) -> Any:
            if str(path).endswith(".spare"):
                emptied.set()
                raise OSError(errno.EROFS, "Read-only file system")
            return real(path, *args)
        return call
    monkeypatch.setattr(os, "truncate", read_only(real_truncate))
    monkeypatch.setattr(os, "unlink", read_only(real_unlink))

    async def scenario(writer: SpoolWriter) -> Entry:
        await writer.remove(entry)
        await asyncio.to_thread(emptied.wait, 10)
        return await asyncio.wait_for(writer.store(new_entry()), 5)
    stored = with_writer(spool, scenario)
    assert os.listdir(spool.path / "incoming") == [stored.id]


@pytest.mark.plan(109)
def test_a_dead_writer_fails_every_waiting_and_later_store_at_once(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread dies (a bug) with stores waiting: each fails at once with
    WriterStopped, so does every later one, on_failure hears why, and a delivered
    entry's removal still happens."""
    def bug(name: str) -> None:
        raise RuntimeError(f"a bug at {name}")
    monkeypatch.setattr(relay.writer, "fault_point", bug)
    failures: list[BaseException] = []
    active = delivered_entry(spool)

    async def main() -> list[Any]:
        writer = SpoolWriter(spool, on_failure=failures.append)
        writer.start()
        try:
            waiting = await asyncio.wait_for(asyncio.gather(
                *(writer.store(new_entry()) for _ in range(3)), return_exceptions=True), 5)
            try:
                await writer.store(new_entry())
            except WriterStopped as exc:
                later: Any = exc
            await asyncio.wait_for(writer.remove(active), 5)
            return [*waiting, later]
        finally:
            await writer.close()
    results = asyncio.run(main())
    assert len(results) == 4 and all(isinstance(r, WriterStopped) for r in results)
    assert "RuntimeError: a bug at in-spool-writer" in str(results[0])
    assert [type(f) for f in failures] == [RuntimeError]
    assert os.listdir(spool.path / "incoming") == []
    assert os.listdir(spool.path / "active") == []


def test_store_then_calls_back_with_the_entry_or_what_kept_it_out(spool: Spool) -> None:
    """store_then's callback is called on the loop with the Entry, or, for a store that
    failed, with the exception store() would raise."""
    async def scenario(writer: SpoolWriter) -> list[Any]:
        loop = asyncio.get_running_loop()
        heard: asyncio.Future[list[Any]] = loop.create_future()
        results: list[Any] = []

        def stored(result: Entry | Exception) -> None:
            results.append(result)
            if len(results) == 2:
                heard.set_result(results)
        writer.store_then(new_entry(), stored)
        writer.store_then(new_entry(size=2_000_000), stored)
        return await heard
    free = os.statvfs(spool.path)
    spool.min_free = free.f_bavail * free.f_frsize - 1_000_000  # room for the small one
    stored_entry, failure = sorted(with_writer(spool, scenario),
                                   key=lambda r: isinstance(r, Exception))
    assert isinstance(stored_entry, Entry)
    assert spool.queue_ids(Queue.INCOMING) == [stored_entry.id]
    assert isinstance(failure, SpoolFull)


def test_a_callback_that_raises_does_not_starve_the_rest_of_its_batch(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stores resolved in one wakeup, the first one's callback raising (a bug): the
    second still hears its entry, and the error goes to the loop's exception handler."""
    syncs = slow_directory_fsyncs(monkeypatch)

    async def scenario(writer: SpoolWriter) -> tuple[list[Any], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        heard: asyncio.Future[Any] = loop.create_future()

        def broken(result: Entry | Exception) -> None:
            raise RuntimeError("a bug in the first callback")
        first = asyncio.ensure_future(writer.store(new_entry()))
        while not syncs:  # the writer is in the first store's fsyncs: the next two wait
            await asyncio.sleep(0.005)
        writer.store_then(new_entry(), broken)
        writer.store_then(new_entry(), heard.set_result)
        await first
        return [await heard], reported
    [entry], reported = with_writer(spool, scenario)
    assert isinstance(entry, Entry)
    assert [str(c["exception"]) for c in reported] == ["a bug in the first callback"]

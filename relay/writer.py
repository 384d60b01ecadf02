"""The spool writer: one thread that stores what the listener received and removes what
delivery sent, for the event loop.

Why one thread, and not one per message (asyncio.to_thread): every thread coming back
from a system call takes the GIL back from the event loop, so with many sessions storing
at once the loop queued behind their threads at each of its own sends and receives (the
GIL's convoy effect; docs/BENCHMARKS.md, "Notes on the spool's design"). Here the one
thread takes whatever is waiting: the new entries are published together with one
directory fsync (Spool.store_many), the delivered entries are removed (and no unlink
waits behind another thread's fsync), and the loop is woken once for all of them. What
the thread does to the spool is relay.spool.ingest's.

A store's future resolves only once its entry is durable: the 250 still waits for the
disk. The listener takes the result by a callback (store_then) rather than a future, so
that its session hears in the wakeup that brings it, not hops of the loop later. State
records (deferrals, failures) keep the default executor: each is an fsync of its own,
and a burst of them while the upstream is down must not hold new mail up.

While a batch waits for its fsyncs, its sessions wait too, and the loop has nothing of
theirs to do: `disk_wait` lets delivery do its work in that moment (relay.delivery says
why), so the thread tells the loop when a batch's fsyncs begin, if anyone is waiting.

A removed entry's file is kept for the next store to write over (Spool.remove); the
thread empties those it still holds once it has had nothing to do for SPARES_LINGER
seconds, and when it stops, so that delivered mail does not stay in tmp/.

Should the thread die all the same (a bug), every store waiting for it and every later
one fails at once with WriterStopped (for the listener to answer 451 4.3.0), `on_failure`
hears of it (the daemon exits for systemd to restart it), and removals go on from the
default executor: a delivered entry must not be sent again for want of its removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .entry import Entry, NewEntry
from .errors import WriterStopped
from .faults import fault_point
from .spool import Spool

SPARES_LINGER = 1.0


class _Waiter(Protocol):
    """Who hears a store's or a removal's result: a future, or a _Callback."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


class _Callback:
    """A waiter that is a function called on the loop with the result, in the wakeup
    that brings it, rather than a future whose task runs only in the loop's next step."""

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self._callback = callback
        self._called = False

    def done(self) -> bool:
        return self._called

    def set_result(self, result: Any, /) -> None:
        self._called = True
        self._callback(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self._called = True
        self._callback(exception)


class SpoolWriter:
    def __init__(self, spool: Spool,
                 on_failure: Callable[[BaseException], None] = lambda exc: None) -> None:
        self._spool = spool
        self._on_failure = on_failure  # called on the loop if the thread dies
        self._work = threading.Condition()
        self._stores: list[tuple[NewEntry, _Waiter]] = []
        self._removals: list[tuple[Entry, _Waiter]] = []
        # The pass in progress, so that a thread that dies midway fails its waiters too.
        self._taken: list[tuple[Any, _Waiter]] = []
        self._failure: BaseException | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Loop side of disk_wait: whether a batch is in its fsyncs now, and who waits for
        # the next one. The thread only reads whether the list is empty.
        self._syncing = False
        self._disk_waiters: list[asyncio.Future[None]] = []

    def start(self) -> None:
        """Start the thread; call from the event loop that will await the results."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    async def store(self, new: NewEntry) -> Entry:
        """Publish `new` durably. Raises what Spool.store_many reports for it, or
        WriterStopped (at once) if the thread is not running."""
        entry: Entry = await self._submit(new, removal=False)
        return entry

    def store_then(self, new: NewEntry, stored: Callable[[Entry | Exception], None]) -> None:
        """Publish `new` durably, then call `stored` on the loop with its Entry, or with
        what store() would raise. It is called in the wakeup that brings the batch's
        results, one step before a task awaiting store() would resume, and whatever has
        become of the caller meanwhile. Raises WriterStopped at once if the thread is not
        running."""
        self._enqueue(new, _Callback(stored), removal=False)

    async def remove(self, entry: Entry) -> None:
        """Delete a delivered entry and its state record (Spool.remove)."""
        try:
            await self._submit(entry, removal=True)
        except WriterStopped:
            await asyncio.to_thread(self._spool.remove, entry)

    async def disk_wait(self, bound: float) -> None:
        """Return once a batch of stores is waiting for the disk: at once if one is now,
        else when the next one starts its fsyncs, or after `bound` seconds."""
        if self._syncing:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._disk_waiters.append(waiter)
        timer = loop.call_later(bound, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._disk_waiters:
                self._disk_waiters.remove(waiter)

    async def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._work:
            self._closing = True
            self._work.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def _submit(self, item: Any, removal: bool) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(item, future, removal)
        return await future

    def _enqueue(self, item: Any, waiter: _Waiter, removal: bool) -> None:
        with self._work:
            if self._failure is not None:
                raise WriterStopped(f"the spool writer failed: {_describe(self._failure)}")
            if self._closing or self._thread is None:
                raise WriterStopped("the spool writer is not running")
            # The list is looked up under the lock: the thread swaps in a new one as it
            # takes a batch, and an item added to the one it took would never be answered.
            (self._removals if removal else self._stores).append((item, waiter))
            self._work.notify()

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - every waiting store hears of the death
            self._die(exc)

    def _serve(self) -> None:
        while True:
            with self._work:
                linger = SPARES_LINGER if self._spool.spares_hold_mail else None
                busy = self._work.wait_for(self._has_work, timeout=linger)
                stopping = busy and not (self._stores or self._removals)
                stores, self._stores = self._stores, []
                self._taken = list(stores)
            if not busy or stopping:
                self._spool.empty_spares()
                if stopping:
                    return
                continue
            fault_point("in-spool-writer")
            results: list[Any] = self._store_all([new for new, _ in stores]) if stores else []
            # Removals are taken once the stores are done, so that those handed over
            # meanwhile (a delivery in the disk's wait) are settled with the batch in one
            # wakeup of the loop, not among the next message's commands.
            with self._work:
                removals, self._removals = self._removals, []
                self._taken += removals
            results += [self._remove(entry) for entry, _ in removals]
            self._settle([*stores, *removals], results, synced=bool(stores))
            self._taken = []

    def _die(self, exc: BaseException) -> None:
        """The thread is ending on an exception: fail every waiter now and from now on."""
        with self._work:
            self._failure = exc
            waiting = [*self._taken, *self._stores, *self._removals]
            self._taken, self._stores, self._removals = [], [], []
        why = f"the spool writer failed: {_describe(exc)}"
        self._call_soon(_resolve, waiting, [WriterStopped(why) for _ in waiting])
        self._call_soon(self._on_failure, exc)

    def _has_work(self) -> bool:
        return bool(self._stores or self._removals or self._closing)

    def _store_all(self, batch: list[NewEntry]) -> list[Entry | Exception]:
        try:
            return self._spool.store_many(batch, syncing=self._tell_syncing)
        except Exception as exc:  # noqa: BLE001 - a bug: the whole batch hears of it
            return [exc] * len(batch)

    def _tell_syncing(self) -> None:
        """In the thread, as a batch's fsyncs begin: wake disk_wait's waiters, if any (a
        stale look at the list costs a waiter at most its bound, or the loop a wakeup)."""
        if self._disk_waiters:
            self._call_soon(self._syncing_started)

    def _syncing_started(self) -> None:
        self._syncing = True
        while self._disk_waiters:
            _wake(self._disk_waiters.pop())

    def _remove(self, entry: Entry) -> Exception | None:
        try:
            self._spool.remove(entry)
        except Exception as exc:  # noqa: BLE001 - returned to the one removal it belongs to
            return exc
        return None

    def _settle(self, waiting: list[tuple[Any, _Waiter]],
                results: list[Any], synced: bool) -> None:
        """Hand the results to the loop in one wakeup."""
        self._call_soon(self._resolve, waiting, results, synced)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop has closed, nobody is waiting any more (the entries are on disk).
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _resolve(self, waiting: list[tuple[Any, _Waiter]], results: list[Any],
                 synced: bool) -> None:
        if synced:
            self._syncing = False
        _resolve(waiting, results)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _resolve(waiting: list[tuple[Any, _Waiter]], results: list[Any]) -> None:
    for (_, future), result in zip(waiting, results, strict=True):
        if future.done():  # its session was cancelled; the entry is on disk all the same
            continue
        try:
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - a callback's bug must not starve the batch
            asyncio.get_running_loop().call_exception_handler(
                {"message": "a spool writer callback failed", "exception": exc})


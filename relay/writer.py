"""The spool writer: one thread that stores what the listener received and removes what
delivery sent, for the event loop.

Why one thread, and not one per message (asyncio.to_thread): every thread coming back
from a system call takes the GIL back from the event loop, so with 16 sessions storing
at once the loop queued behind 16 threads at each of its own sends and receives (the
GIL's convoy effect). A hop between the loop and a thread took 1.5-3 ms at 16 sessions,
and the relay spent more CPU switching threads than running Python. Here the one
thread takes whatever is waiting: the new entries are published together with one
directory fsync (Spool.store_many), and the loop is woken once for all of them. Then
the delivered entries are removed (no unlink waits behind another thread's fsync).

A store's future resolves only once its entry is durable: the 250 still waits for the
disk. A removal is not waited for: nothing on the loop depends on it, so it costs the
loop no wakeup, and the thread logs it. Until it is done the entry is in active/, where
a crash leaves it to be delivered again, the duplicate the contract allows for a message
the upstream accepted in the instant before the crash. State records (deferrals, failures) keep the default executor: each is an fsync
of its own, and a burst of them while the upstream is down must not hold new mail up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from .entry import Entry, NewEntry
from .errors import SpoolError
from .log import log_event
from .spool import Spool


class SpoolWriter:
    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._work = threading.Condition()
        self._stores: list[tuple[NewEntry, asyncio.Future[Entry]]] = []
        self._removals: list[Entry] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; call from the event loop that will await the results."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    async def store(self, new: NewEntry) -> Entry:
        """Publish `new` durably. Raises what Spool.store_many reports for it."""
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        with self._work:
            self._check_running()
            self._stores.append((new, future))
            self._work.notify()
        return await future

    def remove(self, entry: Entry) -> None:
        """Delete a delivered entry and its state record (Spool.remove) soon, and log it."""
        with self._work:
            self._check_running()
            self._removals.append(entry)
            self._work.notify()

    async def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._work:
            self._closing = True
            self._work.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _check_running(self) -> None:
        if self._closing or self._thread is None:
            raise SpoolError("the spool writer is not running")

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._work:
                while not (self._stores or self._removals or self._closing):
                    self._work.wait()
                if not (self._stores or self._removals):
                    return
                stores, self._stores = self._stores, []
                removals, self._removals = self._removals, []
            if stores:
                self._settle(stores, self._store_all([new for new, _ in stores]))
            for entry in removals:
                self._remove(entry)

    def _store_all(self, batch: list[NewEntry]) -> list[Entry | Exception]:
        try:
            return self._spool.store_many(batch)
        except Exception as exc:  # a bug: every caller in the batch hears of it
            return [exc] * len(batch)

    def _remove(self, entry: Entry) -> None:
        try:
            self._spool.remove(entry)
        except Exception as exc:
            # Delivered, and maybe still in active/: the next start would put it back in
            # incoming/ and send it once more. A duplicate, never a loss.
            log_event(logging.ERROR, entry.id, status="not removed", reason=str(exc))
            return
        log_event(logging.INFO, entry.id, status="removed")

    def _settle(self, waiting: list[tuple[Any, asyncio.Future[Any]]],
                results: list[Any]) -> None:
        """Hand the results to the loop in one wakeup."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, waiting, results)
        except RuntimeError:
            pass  # the loop has closed: nobody is waiting any more (the entries are on disk)


def _resolve(waiting: list[tuple[Any, asyncio.Future[Any]]], results: list[Any]) -> None:
    for (_, future), result in zip(waiting, results, strict=True):
        if future.done():  # its session was cancelled; the entry is on disk all the same
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


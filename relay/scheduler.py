"""The delivery scheduler: an in-memory heap of (due time, queue ID), rebuilt from the
spool at start-up; the spool on disk is always the truth and the heap only an index, so a
stale or duplicate heap item costs at most a failed claim. Idle delivery workers wait on
it, and a due entry wakes one of them.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable


class Scheduler:
    """Which entry is due next, and which idle worker hears of it. `_due` holds each ID's
    current due time; heap items that disagree with it are stale (the entry was
    rescheduled) and are skipped.

    Each idle worker waits on a future of its own, and an entry that is due wakes one of
    them, not all: with `upstream.connections` workers idle, waking every one of them for
    each message cost more of the loop than the message's own delivery. Entries due
    later are watched by one timer, armed for the earliest of them, which wakes a worker
    when it fires; so a spool of 100,000 deferred entries costs nothing per new message.
    A worker that takes an entry while another is due wakes the next. The worker that
    went idle last is woken first: its session is the one most recently used, and the
    others' sessions can stay closed.

    While held (delivery paused), nothing is handed out and every entry keeps its due
    time; release() hands out what came due meanwhile.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._idle: list[asyncio.Future[None]] = []  # a stack: the latest idle on top
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # when the timer fires, if it is armed
        self._closed = False
        self._held = False

    def schedule(self, entry_id: str, due: float) -> None:
        self._due[entry_id] = due
        heapq.heappush(self._heap, (due, entry_id))
        self._watch(self._clock())

    def pop_due(self, now: float) -> str | None:
        """The ID of the earliest entry due at `now`, removed from the schedule; else None."""
        while self._heap:
            due, entry_id = self._heap[0]
            if self._due.get(entry_id) != due:
                heapq.heappop(self._heap)
                continue
            if due > now:
                return None
            heapq.heappop(self._heap)
            del self._due[entry_id]
            return entry_id
        return None

    async def next_due(self) -> str | None:
        """Wait until some entry is due and return its ID; None once the scheduler is closed."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            now = self._clock()
            entry_id = None if self._held else self.pop_due(now)
            if entry_id is not None:
                self._watch(now)
                return entry_id
            self._watch(now)  # nothing is due: the timer must be armed for the earliest
            waiter: asyncio.Future[None] = loop.create_future()
            self._idle.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the wakeup was someone's
                raise
            finally:
                if waiter in self._idle:
                    self._idle.remove(waiter)
        return None

    def hold(self) -> None:
        """Hand out nothing until release(); entries stay scheduled as they are."""
        self._held = True

    def release(self) -> None:
        """Hand out entries again, those that came due while held first."""
        if self._held:
            self._held = False
            self._watch(self._clock())

    def close(self) -> None:
        """Make every waiting and future next_due() return None."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._idle:
            self._wake_one()

    def _watch(self, now: float) -> None:
        """Wake a worker if the earliest entry is due, else have the timer fire when it is."""
        if not self._heap or self._closed or self._held:
            return
        earliest = self._heap[0][0]  # perhaps stale: then the worker finds nothing and sleeps
        if earliest <= now:
            self._wake_one()
        elif self._timer is None or earliest < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_due = earliest
            self._timer = asyncio.get_running_loop().call_later(earliest - now, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._watch(self._clock())

    def _wake_one(self) -> None:
        while self._idle:
            if _try_wake(self._idle.pop()):
                return


def _try_wake(waiter: asyncio.Future[None]) -> bool:
    """Wake a waiting worker; False if it had stopped waiting (woken or cancelled)."""
    if waiter.done():
        return False
    waiter.set_result(None)
    return True

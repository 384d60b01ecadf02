"""The scheduler and the delivery workers: spool, policy and upstream tied together.

The scheduler is an in-memory heap of (due time, queue ID), rebuilt from the spool at
start-up; the spool on disk is always the truth and the heap only an index, so a stale or
duplicate heap item costs at most a failed claim. `upstream.connections` workers each own
one upstream session and take the next due entry as soon as it is due: a message handed
over by the listener reaches a free worker at once, with no polling interval.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable

from . import policy
from .bounces import Bounces
from .config import Config
from .entry import Entry, Queue, Status
from .errors import CorruptEntry
from .faults import fault_point
from .history import HistoryWriter
from .log import log_event
from .metrics import Recorder
from .policy import Disposition
from .spool import Spool
from .upstream import UpstreamSession, make_tls_context
from .writer import SpoolWriter

logger = logging.getLogger("relay.delivery")

# Claiming and reading an entry are a rename and small reads, with no fsync: they take
# microseconds, less than a hop to a worker thread and back, which also contends for the
# GIL with the listener. They run on the event loop. Contents larger than this and state
# records (which fsync) go to a worker thread, removals to the spool writer's: an unlink
# can wait behind the journal commit of an fsync, and that wait must not stall every
# session.
INLINE_READ_BYTES = 256 * 1024
# A message the listener has just stored is kept in memory until its first attempt (which
# normally follows at once), if it is no larger than INLINE_READ_BYTES and the ones kept
# so far come to no more than this: during an outage or a backlog the rest are read back
# from the spool as usual.
FRESH_BYTES = 16 * 1024 * 1024
# Delivery shares the event loop with the listener, and a session waits for each of its
# replies while the loop runs whatever else is ready: with one client sending message
# after message, the previous message's delivery (its upstream transaction, removal and
# log lines, about 0.3 ms of the loop) fell between the next message's commands and
# delayed every one of them. But while a message's fsyncs run, its session waits for the
# disk and the loop is idle. So while a few client sessions are open, a worker claims its
# entry and starts on it when a batch of stores begins its fsyncs, or after
# LISTENER_QUIET_WAIT if none does: a relay whose clients are idle delivers a few
# milliseconds later, nothing more. With more sessions than QUIET_SESSIONS the loop is
# seldom idle, and the wait only added to its work (16 sessions: about 5% fewer messages
# in alternating runs).
LISTENER_QUIET_WAIT = 0.005
QUIET_SESSIONS = 4


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
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._idle: list[asyncio.Future[None]] = []  # a stack: the latest idle on top
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # when the timer fires, if it is armed
        self._closed = False

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
            entry_id = self.pop_due(now)
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
        if not self._heap or self._closed:
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
            if _wake(self._idle.pop()):
                return


def _wake(waiter: asyncio.Future[None]) -> bool:
    """Wake a waiting worker; False if it had stopped waiting (woken or cancelled)."""
    if waiter.done():
        return False
    waiter.set_result(None)
    return True


class Delivery:
    def __init__(self, spool: Spool, writer: SpoolWriter, config: Config,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 client_sessions: Callable[[], int] = lambda: 0,
                 metrics: Recorder | None = None, bounces: Bounces | None = None,
                 history: HistoryWriter | None = None, hostname: str | None = None) -> None:
        self.spool = spool
        self.metrics = metrics or Recorder()
        self.bounces = bounces  # None: failures are recorded without notices
        self.history = history  # told of each attempt's outcome (the delivery journal)
        self.hostname = hostname  # EHLO's name; None: the upstream session looks it up
        self.writer = writer
        self.config = config
        self._client_sessions = client_sessions  # how many the listener has open now
        self.scheduler = Scheduler(clock)
        self._clock = clock
        self._rand = rand
        self._tls_context = make_tls_context(config.upstream) if config.upstream else None
        # Bumped when the upstream config changes: workers then replace their sessions.
        self._generation = 0
        self._workers: dict[int, asyncio.Task[None]] = {}
        # Set while the upstream refuses our credentials: workers wait instead of logging
        # in once per message, until a reload or until retry_max has passed.
        self._paused_until: float | None = None
        self._resumed = asyncio.Event()
        # Entries stored by this process and not yet attempted, with their content.
        self._fresh: dict[str, tuple[Entry, tuple[bytes, ...]]] = {}
        self._fresh_bytes = 0

    def schedule(self, entry_id: str, due: float = 0.0) -> None:
        self.scheduler.schedule(entry_id, due)

    def schedule_new(self, entry: Entry, parts: tuple[bytes, ...]) -> None:
        """A message the listener has just stored, due now, with the content it holds.

        Its first attempt then needs no read of the spool: the file it wrote is immutable
        and no state record exists before a first attempt (Spool.claim_new). Reading the
        envelope and the content back cost the event loop two opens, two reads and a
        failed open per message, time that a session waiting for its reply had to wait too.
        One stored into scheduled/ is due at its send time, and read then.
        """
        if entry.queue is Queue.SCHEDULED and entry.send_at is not None:
            self.scheduler.schedule(entry.id, entry.send_at)
            return
        if entry.size <= INLINE_READ_BYTES and self._fresh_bytes + entry.size <= FRESH_BYTES:
            self._fresh[entry.id] = (entry, parts)
            self._fresh_bytes += entry.size
        self.scheduler.schedule(entry.id, 0.0)

    async def watch_incoming(self, interval: float = 1.0) -> None:
        """Schedule whatever operators put into incoming/ (flush, release, requeue), and
        the new times of entries they rescheduled (named in wake/).

        The relay queue commands work on the spool directly, with or without a daemon; the
        daemon notices their effect here within `interval`, by the directory's mtime.
        """
        seen = self.spool.incoming_version()
        while True:
            await asyncio.sleep(interval)
            for entry_id, due in await asyncio.to_thread(self.spool.take_wakes):
                self.scheduler.schedule(entry_id, due)
            version = await asyncio.to_thread(self.spool.incoming_version)
            if version == seen:
                continue
            seen = version
            for entry_id in await asyncio.to_thread(self.spool.queue_ids, Queue.INCOMING):
                self.scheduler.schedule(entry_id, 0.0)

    @property
    def wanted_workers(self) -> int:
        return self.config.upstream.connections if self.config.upstream else 1

    def start(self) -> None:
        """Start workers up to the wanted count; those numbered beyond it retire."""
        for number in range(self.wanted_workers):
            if number not in self._workers or self._workers[number].done():
                self._workers[number] = asyncio.create_task(self._work(number),
                                                            name=f"delivery-{number}")

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: policy at once, upstream settings and credentials with
        each worker's next message, the number of workers now."""
        upstream_changed = config.upstream != self.config.upstream
        self.config = config
        if self._paused_until is not None:
            # The operator has fixed the credentials, here or at the provider.
            self._resume()
            log_event(logging.INFO, None, event="delivery", status="resumed",
                      reason="configuration reloaded")
        if upstream_changed:
            self._tls_context = make_tls_context(config.upstream) if config.upstream else None
            self._generation += 1
            # Entries kept for want of an upstream (or for a broken one) may flow now.
            for entry_id, due in self.spool.due_times():
                self.schedule(entry_id, due)
        self.start()

    async def stop(self, grace: float) -> None:
        """Stop claiming; give in-flight attempts `grace` seconds, then cancel them (their
        entries go back to incoming/ untouched); each worker closes its session."""
        self.scheduler.close()
        self._resume()
        workers = list(self._workers.values())
        if workers:
            _, still_running = await asyncio.wait(workers, timeout=grace)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _new_session(self) -> UpstreamSession | None:
        if self.config.upstream is None:
            return None
        return UpstreamSession(self.config.upstream, self._tls_context, self.hostname)

    async def _work(self, number: int) -> None:
        session: UpstreamSession | None = None
        generation = -1
        try:
            while number < self.wanted_workers:
                await self._wait_while_paused()
                entry_id = await self.scheduler.next_due()
                if entry_id is None:
                    return
                if generation != self._generation:
                    if session is not None:
                        await session.close()
                    session, generation = self._new_session(), self._generation
                try:
                    await self._process(entry_id, session)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug or a broken spool must not kill the worker; the entry stays on disk.
                    logger.exception("%s: delivery failed unexpectedly", entry_id)
        finally:
            if session is not None:
                await session.close()

    def _pause(self, reason: str) -> None:
        if self._paused_until is not None:
            return
        pause = self.config.delivery.retry_max
        self._paused_until = self._clock() + pause
        self._resumed.clear()
        self.metrics.paused(True)
        log_event(logging.ERROR, None, event="delivery", status="paused", reason=reason,
                  resumes=f"on reload, or in {pause:g}s with one more try")

    def _resume(self) -> None:
        self.metrics.paused(False)
        self._paused_until = None
        self._resumed.set()

    async def _wait_while_paused(self) -> None:
        while self._paused_until is not None:
            remaining = self._paused_until - self._clock()
            if remaining <= 0:
                self._resume()  # the next attempt tries the credentials again
                return
            try:
                await asyncio.wait_for(self._resumed.wait(), remaining)
            except TimeoutError:
                pass

    async def _process(self, entry_id: str, session: UpstreamSession | None) -> None:
        fresh = self._fresh.pop(entry_id, None)
        content: bytes | None = None
        try:
            if fresh is None:
                entry = self.spool.claim(entry_id, self._clock())
            else:
                self._fresh_bytes -= fresh[0].size
                entry = self.spool.claim_new(fresh[0])
                content = b"".join(fresh[1])
        except CorruptEntry as exc:
            log_event(logging.ERROR, entry_id, status="corrupt", reason=exc.reason,
                      moved_to="corrupt/")
            return
        if entry is None:
            # Not due after all (an operator gave it a later time): watch for that time.
            due = self.spool.waiting_until(entry_id)
            if due is not None:
                self.schedule(entry_id, due)
            return
        try:
            # Claimed first, so that the entry waits in active/: in incoming/, the watcher
            # could schedule it a second time.
            if 0 < self._client_sessions() <= QUIET_SESSIONS:
                await self.writer.disk_wait(LISTENER_QUIET_WAIT)
            await self._attempt(entry, session, content)
        except BaseException:
            # Cancelled (shutdown past the grace period) or failed before the outcome was
            # recorded: hand the entry back untouched, to be tried again after retry_min.
            due = self._clock() + self.config.delivery.retry_min
            self.spool.unclaim(entry, due)
            self.schedule(entry.id, due)
            raise

    async def _attempt(self, entry: Entry, session: UpstreamSession | None,
                       content: bytes | None) -> None:
        """One attempt at the entry's pending recipients; `content` if already in hand."""
        if session is None:
            waiting = await asyncio.to_thread(self.spool.defer, policy.await_upstream(entry))
            log_event(logging.INFO, entry.id, status="deferred", reply=waiting.last_error)
            return
        if content is None:
            content = (self.spool.content(entry) if entry.size <= INLINE_READ_BYTES
                       else await asyncio.to_thread(self.spool.content, entry))
        pending = [r.address for r in entry.pending]
        started = self._clock()
        result = await session.deliver(entry.sender, pending, content, entry.smtputf8)
        fault_point("after-upstream-reply-before-state")
        settled = policy.settle(entry, result, started, self._clock(), self.config.delivery,
                                self._rand())
        after = settled.entry
        if settled.disposition is Disposition.DELIVERED:
            await self.writer.remove(after)
        elif settled.disposition is Disposition.DEFERRED:
            after = await asyncio.to_thread(self.spool.defer, after)
            assert after.next_attempt is not None
            self.schedule(after.id, after.next_attempt)
        elif self.bounces is not None:
            after = await self.bounces.fail(after)
        else:
            after = await asyncio.to_thread(self.spool.fail, after)
        self._log_outcome(entry, after, settled.disposition)
        self.metrics.attempted(entry, after, result, self._clock())
        if self.history is not None:
            self.history.attempt(entry, after, self._clock())
        if policy.credentials_rejected(result):
            self._pause(f"upstream rejected the credentials: {result.error}")

    def _log_outcome(self, before: Entry, after: Entry, disposition: Disposition) -> None:
        attempt = after.attempts[-1]
        delay = round(self._clock() - after.arrived, 2)
        for old, new in zip(before.recipients, after.recipients, strict=True):
            if old.status is not Status.PENDING:
                continue
            status = "deferred" if new.status is Status.PENDING else new.status.value
            level = logging.INFO if status == "sent" else logging.WARNING
            log_event(level, after.id, to=new.address, relay=attempt.relay, delay=delay,
                      attempt=len(after.attempts), status=status, reply=new.reply)
        if disposition is Disposition.DELIVERED:
            log_event(logging.INFO, after.id, status="removed")
        elif disposition is Disposition.FAILED:
            log_event(logging.WARNING, after.id, status="failed", reason=after.last_error,
                      moved_to="failed/")

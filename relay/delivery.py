"""The delivery workers: spool, policy and upstream tied together.

`upstream.connections` workers each own one upstream session and take the next due entry
from the scheduler (relay.scheduler) as soon as it is due: a message handed over by the
listener reaches a free worker at once, with no polling interval.

Every entry in active/ has an owner: the worker that claimed it (`_owned`), from the
claim's rename until the rename that ends the attempt. One that has none (an error
between the two) goes back to the queue at the next sweep, within SWEEP_SECONDS. An
attempt's outcome is recorded before the entry is scheduled again; one that cannot be
recorded is set aside in failed/ with the reason, never retried blindly, since a retry
could send the message again to recipients that have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable

from . import policy
from .bounces import Bounces
from .config import Config
from .entry import Entry, Queue, Status
from .errors import CorruptEntry, SpoolError, TaskFailed
from .faults import fault_point
from .history import HistoryWriter
from .log import log_event, log_failure
from .metrics import Recorder
from .policy import AttemptResult, Disposition, Reply, Stage
from .scheduler import Scheduler
from .spool import Spool
from .supervise import supervised
from .upstream import UpstreamSession, make_tls_context
from .writer import SpoolWriter

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
# How often active/ is looked through for entries no worker owns (Delivery.sweep).
SWEEP_SECONDS = 2.0


class Delivery:
    def __init__(self, spool: Spool, writer: SpoolWriter, config: Config,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 client_sessions: Callable[[], int] = lambda: 0,
                 metrics: Recorder | None = None, bounces: Bounces | None = None,
                 history: HistoryWriter | None = None, hostname: str | None = None,
                 on_fatal: Callable[[TaskFailed], None] = lambda failure: None) -> None:
        self.spool = spool
        self.metrics = metrics or Recorder()
        self.bounces = bounces  # None: failures are recorded without notices
        self.history = history  # told of each attempt's outcome (the delivery journal)
        self.hostname = hostname  # EHLO's name; None: the upstream session looks it up
        self.writer = writer
        self.config = config
        self._on_fatal = on_fatal  # a worker kept dying (relay.supervise)
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
        # Entries in active/ that a worker owns; and those left there because even setting
        # them aside failed, which the sweep must not send again.
        self._owned: set[str] = set()
        self._stuck: set[str] = set()

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

    async def sweep(self, interval: float = SWEEP_SECONDS) -> None:
        """Every `interval`, return what sits in active/ with no owner (sweep_once)."""
        while True:
            await asyncio.sleep(interval)
            self.sweep_once()

    def sweep_once(self) -> list[str]:
        """Move every entry in active/ that no worker owns back to deferred/, due after
        retry_min, and return their IDs. On the event loop, as claims are, so that no
        claim can fall between the listing and the check of its owner."""
        returned: list[str] = []
        due = self._clock() + self.config.delivery.retry_min
        for entry_id in self.spool.active_ids():
            if entry_id in self._owned or entry_id in self._stuck:
                continue
            if self.spool.return_to_queue(entry_id, due):
                self.schedule(entry_id, due)
                log_event(logging.WARNING, entry_id, event="sweep", status="deferred",
                          reason="in active/ with no delivery owning it")
                returned.append(entry_id)
        return returned

    @property
    def wanted_workers(self) -> int:
        return self.config.upstream.connections if self.config.upstream else 1

    def start(self) -> None:
        """Start workers up to the wanted count; those numbered beyond it retire. Each is
        supervised: restarted if it dies, the daemon told if it keeps dying."""
        for number in range(self.wanted_workers):
            if number not in self._workers or self._workers[number].done():
                name = f"delivery-{number}"
                work = functools.partial(self._work, number)
                self._workers[number] = asyncio.create_task(
                    supervised(name, work, self._on_fatal), name=name)

    def prepare(self, config: Config) -> Callable[[], None]:
        """Everything a reloaded config needs that can fail (its TLS context, and with a
        new upstream the queue's listing), done now; returns the switch to it, which
        cannot fail. Blocks: run it in a thread. Raises ConfigError or OSError."""
        upstream_changed = config.upstream != self.config.upstream
        tls_context = make_tls_context(config.upstream) if config.upstream else None
        # Entries kept for want of an upstream (or for a broken one) may flow now.
        due = self.spool.due_times() if upstream_changed else []

        def switch() -> None:
            self.config = config
            self._tls_context = tls_context
            if self._paused_until is not None:
                # The operator has fixed the credentials, here or at the provider.
                self._resume()
                log_event(logging.INFO, None, event="delivery", status="resumed",
                          reason="configuration reloaded")
            if upstream_changed:
                self._generation += 1  # workers replace their sessions
                for entry_id, when in due:
                    self.schedule(entry_id, when)
            self.start()
        return switch

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
                fault_point("in-delivery-worker")
                await self._wait_while_paused()
                entry_id = await self.scheduler.next_due()
                if entry_id is None:
                    return
                if self._paused_until is not None:
                    # Taken just as another worker paused delivery: it waits with the
                    # rest (it was due, so it is due now), and no login happens.
                    self.schedule(entry_id, self._clock())
                    continue
                try:
                    if generation != self._generation:
                        if session is not None:
                            await session.close()
                        session, generation = self._new_session(), self._generation
                    await self._process(entry_id, session)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    # A bug must not kill the worker; the entry stays on disk, scheduled
                    # again (if it was never claimed, nothing else would schedule it).
                    log_failure(logging.ERROR, entry_id, exc, status="error",
                                reason=f"delivery failed unexpectedly: {exc}")
                    self.schedule(entry_id, self._clock() + self.config.delivery.retry_min)
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
        # Retries coming due, a flush, new mail: all wait, with no login, until the end.
        self.scheduler.hold()
        log_event(logging.ERROR, None, event="delivery", status="paused", reason=reason,
                  resumes=f"on reload, or in {pause:g}s with one more try")

    def _resume(self) -> None:
        self.metrics.paused(False)
        self._paused_until = None
        self._resumed.set()
        self.scheduler.release()

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
        except SpoolError as exc:
            # Not claimed (it is back where it was): try again later.
            due = self._clock() + self.config.delivery.retry_min
            log_event(logging.WARNING, entry_id, status="not claimed", reason=str(exc))
            self.schedule(entry_id, due)
            return
        if entry is None:
            # Not due after all (an operator gave it a later time): watch for that time.
            due = self.spool.waiting_until(entry_id)
            if due is not None:
                self.schedule(entry_id, due)
            return
        self._owned.add(entry.id)  # in the same step as the claim's rename: see sweep_once
        try:
            # Claimed first, so that the entry waits in active/: in incoming/, the watcher
            # could schedule it a second time.
            if 0 < self._client_sessions() <= QUIET_SESSIONS:
                await self.writer.disk_wait(LISTENER_QUIET_WAIT)
            await self._attempt(entry, session, content)
        except asyncio.CancelledError:
            # Shutdown past the grace period: hand the entry back, to be tried again
            # after retry_min (an attempt cut off after the final dot may duplicate).
            due = self._clock() + self.config.delivery.retry_min
            with contextlib.suppress(OSError):  # else the sweep, or the next start, does it
                self.spool.unclaim(entry, due)
            self.schedule(entry.id, due)
            raise
        except Exception as exc:  # noqa: BLE001
            # A bug: whether the upstream has the message cannot be known.
            await self._set_aside(entry, "the attempt failed", exc)
        finally:
            self._owned.discard(entry.id)

    async def _attempt(self, entry: Entry, session: UpstreamSession | None,
                       content: bytes | None) -> None:
        """One attempt at the entry's pending recipients; `content` if already in hand."""
        if session is None:
            try:
                waiting = await asyncio.to_thread(self.spool.defer, policy.await_upstream(entry))
            except SpoolError as exc:
                # Not an attempt: nothing was sent, and nothing is lost by trying later.
                due = self._clock() + self.config.delivery.retry_min
                self.spool.return_to_queue(entry.id, due)
                self.schedule(entry.id, due)
                log_event(logging.WARNING, entry.id, status="deferred", reason=str(exc))
                return
            log_event(logging.INFO, entry.id, status="deferred", reply=waiting.last_error)
            return
        started = self._clock()
        try:
            if content is None:
                content = (self.spool.content(entry) if entry.size <= INLINE_READ_BYTES
                           else await asyncio.to_thread(self.spool.content, entry))
        except SpoolError as exc:
            # Nothing was sent: an attempt that failed for now, recorded as any other.
            reply = Reply(None, f"cannot read the message from the spool: {exc}")
            result = AttemptResult(relay=session.config.name, error=reply, stage=Stage.SESSION)
        else:
            pending = [r.address for r in entry.pending]
            result = await session.deliver(entry.sender, pending, content, entry.smtputf8)
            fault_point("after-upstream-reply-before-state")
        if policy.credentials_rejected(result):
            self._pause(f"upstream rejected the credentials: {result.error}")
        await self._record(entry, result, started)

    async def _record(self, entry: Entry, result: AttemptResult, started: float) -> None:
        """Apply an attempt's result to the entry and make it durable before anything else
        happens to the entry; if that fails, set it aside."""
        settled: policy.Settlement | None = None
        try:
            settled = policy.settle(entry, result, started, self._clock(),
                                    self.config.delivery, self._rand())
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
        except Exception as exc:  # noqa: BLE001
            outcome = settled.entry if settled is not None else entry
            if settled is not None:
                self._log_recipients(entry, outcome)
            await self._set_aside(outcome, f"its outcome ({result.summary}) could not be "
                                           "recorded", exc)
            return
        self._log_outcome(entry, after, settled.disposition)
        self.metrics.attempted(entry, after, result, self._clock())
        if self.history is not None:
            self.history.attempt(entry, after, self._clock())

    async def _set_aside(self, entry: Entry, what: str, exc: Exception) -> None:
        """Move an entry whose attempt went wrong to failed/, with the reason: sending it
        again could reach recipients that already have it. An operator requeues it."""
        reason = (f"set aside: {what} ({type(exc).__name__}: {exc}); a retry could deliver "
                  "it twice, so it waits for `relay queue requeue`")
        try:
            await asyncio.to_thread(self.spool.set_aside, entry, reason)
        except SpoolError as again:
            self._stuck.add(entry.id)
            log_failure(logging.ERROR, entry.id, exc, status="stuck", reason=reason,
                        error=str(again), kept="in active/ until a restart")
            return
        log_failure(logging.ERROR, entry.id, exc, status="failed", reason=reason,
                    moved_to="failed/")

    def _log_outcome(self, before: Entry, after: Entry, disposition: Disposition) -> None:
        self._log_recipients(before, after)
        if disposition is Disposition.DELIVERED:
            log_event(logging.INFO, after.id, status="removed")
        elif disposition is Disposition.FAILED:
            log_event(logging.WARNING, after.id, status="failed", reason=after.last_error,
                      moved_to="failed/")

    def _log_recipients(self, before: Entry, after: Entry) -> None:
        attempt = after.attempts[-1]
        delay = round(self._clock() - after.arrived, 2)
        for old, new in zip(before.recipients, after.recipients, strict=True):
            if old.status is not Status.PENDING:
                continue
            status = "deferred" if new.status is Status.PENDING else new.status.value
            level = logging.INFO if status == "sent" else logging.WARNING
            log_event(level, after.id, to=new.address, relay=attempt.relay, delay=delay,
                      attempt=len(after.attempts), status=status, reply=new.reply)

"""The delivery workers: spool, policy and upstream tied together.

The workers take the next due entry from the scheduler (relay.scheduler) as soon as it is
due, so that a message handed over by the listener reaches a free worker at once, with no
polling interval; each attempt goes over the message's route of upstreams (relay.attempt,
relay.upstreams). While no upstream can take anything (all down, or paused for rejected
credentials) the scheduler is held: entries keep their places instead of being claimed
only to be put back, and no login is tried until an upstream's time comes or a reload.
What is kept in memory, what is read on the loop, and when a worker waits for the
listener are relay.tuning's heuristics.

Every entry in active/ has an owner: the worker that claimed it (`_owned`), from the
claim's rename until the rename that ends the attempt. One that has none (an error
between the two) goes back to the queue at the next sweep, within SWEEP_SECONDS. An
attempt's outcome is recorded before the entry is scheduled again; one that cannot be
recorded is set aside in failed/ with the reason, never retried blindly, since a retry
could send the message again to recipients that have it. If even that move fails, the
entry stays in active/, never sent again, and each sweep tries the move once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable

from . import policy, routing, tuning
from .attempt import Attempter
from .bounces import Bounces
from .breaker import Circuit
from .config import Config
from .entry import Entry, Queue, Status
from .errors import CorruptEntry, SpoolError, TaskFailed
from .faults import fault_point
from .history import HistoryWriter
from .log import log_event, log_failure
from .metrics import Recorder
from .outcome import (
    AttemptResult,
    Disposition,
    Limited,
    Reply,
    Settlement,
    Stage,
    Tried,
)
from .routing import Gate
from .scheduler import Scheduler
from .spool import Spool
from .supervise import supervised
from .upstreams import Upstreams, prepare
from .writer import SpoolWriter

# How often active/ is looked through for entries no worker owns (Delivery.sweep).
SWEEP_SECONDS = 2.0
# How often incoming/ and wake/ are looked at for what operators did (watch_incoming).
INCOMING_SECONDS = 1.0


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
        self.upstreams = Upstreams(prepare(config), hostname, self._gates_changed)
        self.attempter = Attempter(self.upstreams, config.delivery, self.metrics, clock, rand)
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._circuits: dict[str, tuple[Circuit, bool]] = {}  # as last published
        self._release: asyncio.TimerHandle | None = None  # of a held scheduler
        # Entries stored by this process and not yet attempted, with their content.
        self._fresh: dict[str, tuple[Entry, tuple[bytes, ...]]] = {}
        self._fresh_bytes = 0
        # Entries in active/ that a worker owns; and those left there because even setting
        # them aside failed, with the reason: the sweep must not send them again, and
        # tries to set them aside once more.
        self._owned: set[str] = set()
        self._stuck: dict[str, tuple[Entry, str]] = {}

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
        if tuning.keep_fresh(entry.size, self._fresh_bytes):
            self._fresh[entry.id] = (entry, parts)
            self._fresh_bytes += entry.size
        self.scheduler.schedule(entry.id, 0.0)

    async def watch_incoming(self, interval: float = INCOMING_SECONDS) -> None:
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
            if await asyncio.to_thread(self.spool.take_retry):
                self.upstreams.retry_down(self._clock())
            version = await asyncio.to_thread(self.spool.incoming_version)
            if version == seen:
                continue
            seen = version
            for entry_id in await asyncio.to_thread(self.spool.queue_ids, Queue.INCOMING):
                self.scheduler.schedule(entry_id, 0.0)

    async def sweep(self, interval: float = SWEEP_SECONDS) -> None:
        """Every `interval`, return what sits in active/ with no owner (sweep_once), and
        try again to set aside what could not be (a disk that has come back)."""
        while True:
            await asyncio.sleep(interval)
            self.sweep_once()
            await self._set_aside_stuck()

    async def _set_aside_stuck(self) -> None:
        for entry_id, (entry, reason) in list(self._stuck.items()):
            try:
                await asyncio.to_thread(self.spool.set_aside, entry, reason)
            except SpoolError:
                continue  # logged when it first failed; tried again at the next sweep
            del self._stuck[entry_id]
            log_event(logging.WARNING, entry_id, status="failed", reason=reason,
                      moved_to="failed/")

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
        return self.upstreams.workers

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
        """Everything a reloaded config needs that can fail (TLS contexts, API clients, and
        with new upstreams the queue's listing), done now; returns the switch to it, which
        cannot fail. Blocks: run it in a thread. Raises ConfigError or OSError."""
        upstreams_changed = config.upstreams != self.config.upstreams
        prepared = prepare(config)
        # Entries kept for want of an upstream (or for a broken one) may flow now.
        due = self.spool.due_times() if upstreams_changed else []

        def switch() -> None:
            old = self.upstreams
            self.config = config
            # The operator has fixed what was wrong, here or at the provider: every
            # upstream starts up again.
            self.upstreams = Upstreams(prepared, self.hostname, self._gates_changed)
            self.attempter = Attempter(self.upstreams, config.delivery, self.metrics,
                                       self._clock, self._rand)
            asyncio.get_running_loop().create_task(old.close())
            self._gates_changed(self.upstreams.gates)
            for entry_id, when in due:
                self.schedule(entry_id, when)
            self.start()
        return switch

    async def stop(self, grace: float) -> None:
        """Stop claiming; give in-flight attempts `grace` seconds, then cancel them (their
        entries go back to incoming/ untouched); each worker closes its session."""
        self.scheduler.close()
        workers = list(self._workers.values())
        if workers:
            _, still_running = await asyncio.wait(workers, timeout=grace)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await self.upstreams.close()

    async def _work(self, number: int) -> None:
        while number < self.wanted_workers:
            fault_point("in-delivery-worker")
            entry_id = await self.scheduler.next_due()
            if entry_id is None:
                return
            try:
                await self._process(entry_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker
                # A bug must not kill the worker; the entry stays on disk, scheduled again
                # (if it was never claimed, nothing else would schedule it).
                log_failure(logging.ERROR, entry_id, exc, status="error",
                            reason=f"delivery failed unexpectedly: {exc}")
                self.schedule(entry_id, self._clock() + self.config.delivery.retry_min)

    def _gates_changed(self, gates: dict[str, Gate]) -> None:
        """An upstream went down, was paused, or came back: tell operators (the log, the
        metrics, the spool's view for `relay queue`), and hold the scheduler while no
        upstream can take anything."""
        now = self._clock()
        for name, gate in gates.items():
            breaker = gate.breaker
            state = (breaker.circuit, breaker.paused)
            before = self._circuits.get(name, (Circuit.CLOSED, False))
            self._circuits[name] = state
            if state == before:
                continue
            if breaker.paused and breaker.circuit is Circuit.OPEN:
                self.metrics.paused(name, True)
                log_event(logging.ERROR, None, event="delivery", upstream=name, status="paused",
                          reason=f"upstream rejected the credentials: {breaker.reason}",
                          resumes=f"on reload, or in {breaker.until - now:.0f}s with one "
                                  "more try")
            elif before[1] and not breaker.paused:
                self.metrics.paused(name, False)
                log_event(logging.INFO, None, event="delivery", upstream=name, status="resumed")
        self.spool.publish_upstreams({name: {
            "state": "paused" if g.breaker.paused else g.breaker.circuit.value,
            "until": g.breaker.until, "reason": g.breaker.reason} for name, g in gates.items()})
        self._hold_while_down(gates, now)

    def _hold_while_down(self, gates: dict[str, Gate], now: float) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if not gates or any(g.breaker.circuit is Circuit.CLOSED or
                            (g.breaker.circuit is Circuit.OPEN and g.breaker.until <= now)
                            for g in gates.values()):
            self.scheduler.release()
            return
        # Every upstream is down, paused, or being probed: nothing is handed out until the
        # first of them may be tried again (or a probe's outcome changes a gate).
        self.scheduler.hold()
        soonest = min(g.breaker.until for g in gates.values())
        self._release = asyncio.get_running_loop().call_later(
            max(soonest - now, 0.0), self._hold_while_down, gates, soonest)

    async def _process(self, entry_id: str) -> None:
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
            until = self.spool.waiting_until(entry_id)
            if until is not None:
                self.schedule(entry_id, until)
            return
        self._owned.add(entry.id)  # in the same step as the claim's rename: see sweep_once
        try:
            # Claimed first, so that the entry waits in active/: in incoming/, the watcher
            # could schedule it a second time.
            if tuning.yield_to_listener(self._client_sessions()):
                await self.writer.disk_wait(tuning.LISTENER_QUIET_WAIT)
            await self._attempt(entry, content)
        except asyncio.CancelledError:
            # Shutdown past the grace period: hand the entry back, to be tried again
            # after retry_min (an attempt cut off after the final dot may duplicate).
            due = self._clock() + self.config.delivery.retry_min
            with contextlib.suppress(OSError):  # else the sweep, or the next start, does it
                self.spool.unclaim(entry, due)
            self.schedule(entry.id, due)
            raise
        except Exception as exc:  # noqa: BLE001 - set aside, never retried blind
            # A bug: whether the upstream has the message cannot be known.
            await self._set_aside(entry, "the attempt failed", exc)
        finally:
            self._owned.discard(entry.id)

    async def _attempt(self, entry: Entry, content: bytes | None) -> None:
        """One attempt at the entry's pending recipients; `content` if already in hand."""
        if not self.config.upstreams:
            await self._defer_unattempted(entry, policy.await_upstream(entry), None)
            return
        started = self._clock()
        route = routing.route(self.config.upstreams, entry.sender)
        try:
            if content is None:
                content = (self.spool.content(entry) if tuning.read_inline(entry.size)
                           else await asyncio.to_thread(self.spool.content, entry))
        except SpoolError as exc:
            # Nothing was sent: an attempt that failed for now, recorded as any other.
            reply = Reply(None, f"cannot read the message from the spool: {exc}")
            relay = route[0].name if route else "-"
            result = AttemptResult(relay=relay, error=reply, stage=Stage.SESSION)
            await self._record(entry, result, started, relay)
            return
        outcome = await self.attempter.attempt(entry, content, route)
        fault_point("after-upstream-reply-before-state")
        if isinstance(outcome, Tried):
            await self._record(outcome.entry, outcome.result, outcome.started, outcome.upstream)
        elif isinstance(outcome, Limited):
            limited = policy.after_rate_limit(outcome.entry, outcome.result, outcome.reply,
                                              outcome.until)
            await self._defer_unattempted(entry, limited, outcome.until)
        elif outcome.record:
            await self._defer_unattempted(
                entry, policy.await_turn(outcome.entry, outcome.until, outcome.why),
                outcome.until)
        else:
            # Every upstream is down: back in the queue as it was, no record to write.
            self.spool.return_to_queue(entry.id, outcome.until)
            self.schedule(entry.id, outcome.until)

    async def _defer_unattempted(self, entry: Entry, waiting: Entry,
                                 due: float | None) -> None:
        """Keep an entry that was not attempted (no upstream, waiting for a rate, rate
        limited), with the reason shown by `relay queue`; due at `due` (None: not before
        an upstream is configured)."""
        try:
            waiting = await asyncio.to_thread(self.spool.defer, waiting)
        except SpoolError as exc:
            # Nothing was sent, and nothing is lost by trying later.
            later = self._clock() + self.config.delivery.retry_min
            self.spool.return_to_queue(entry.id, later)
            self.schedule(entry.id, later)
            log_event(logging.WARNING, entry.id, status="deferred", reason=str(exc))
            return
        if due is not None:
            self.schedule(entry.id, due)
        log_event(logging.INFO, entry.id, status="deferred", reply=waiting.last_error)

    async def _record(self, entry: Entry, result: AttemptResult, started: float,
                      upstream: str) -> None:
        """Apply an attempt's result to the entry and make it durable before anything else
        happens to the entry; if that fails, set it aside."""
        settled: Settlement | None = None
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
        except Exception as exc:  # noqa: BLE001 - the entry is logged and kept, never lost
            outcome = settled.entry if settled is not None else entry
            if settled is not None:
                self._log_recipients(entry, outcome)
            await self._set_aside(outcome, f"its outcome ({result.summary}) could not be "
                                           "recorded", exc)
            return
        self._log_outcome(entry, after, settled.disposition)
        self.metrics.attempted(upstream, entry, after, self._clock())
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
            self._stuck[entry.id] = (entry, reason)
            log_failure(logging.ERROR, entry.id, exc, status="stuck", reason=reason,
                        error=str(again), kept="in active/, set aside again at each sweep")
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

"""`relay stats`: what the relay did over a window, from the delivery history and the
live queue. Pure: the records, the queue entries and `now` are arguments.

- received: messages that arrived in the window, finished (in the history) or not (in
  the queue; a queue ID carries its arrival time);
- sent, failed, expired, deleted: recipients whose outcome fell in the window;
- deferred attempts: attempts that left a recipient pending. For a message still in the
  queue they are counted from its attempt history, by attempt time; for one that has
  left it, from its records, once its last outcome is in the window (every attempt but
  a last one that settled a recipient);
- delay: seconds from when a sent message was due to its outcome, p50/p95/p99/max;
- the commonest failure replies, the figures per upstream, the queue by state and its
  oldest entry.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .entry import Entry, Queue
from .history import Record

TOP_REPLIES = 5
_EXPIRED_PREFIX = re.compile(r"^expired after \d+ attempts: ")


@dataclass(frozen=True)
class Delay:
    p50: float
    p95: float
    p99: float
    max: float


@dataclass
class Upstream:
    sent: int = 0
    failed: int = 0
    expired: int = 0
    delays: list[float] = field(default_factory=list)

    @property
    def delay(self) -> Delay | None:
        return delay_of(self.delays)


@dataclass(frozen=True)
class Stats:
    since: float
    now: float
    received: int
    sent: int
    deferred_attempts: int
    failed: int
    expired: int
    deleted: int
    delay: Delay | None  # None when nothing was sent
    top_failures: list[tuple[str, int]]  # (reply, recipients), commonest first
    upstreams: dict[str, Upstream]
    queue: dict[str, int]  # entries by state
    oldest: tuple[str, float] | None  # (queue ID, arrival) of the oldest entry


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values (p50 of 1..4 is 2; p100 the largest)."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def delay_of(delays: list[float]) -> Delay | None:
    if not delays:
        return None
    ordered = sorted(delays)
    return Delay(percentile(ordered, 0.50), percentile(ordered, 0.95),
                 percentile(ordered, 0.99), ordered[-1])


def arrival_of(entry_id: str) -> float:
    """A queue ID's arrival time: it begins with the microseconds (relay.spool.new_id)."""
    return int(entry_id[:13], 16) / 1_000_000


def compute(records: Iterable[Record], queued: dict[Queue, list[str]],
            attempted: list[Entry], since: float, now: float) -> Stats:
    """The window [since, now]: `records` are the history's from `since` on, `queued` the
    IDs in each queue directory, `attempted` the queued entries that have an attempt
    history (the others have had no attempt)."""
    window = [r for r in records if since <= r.at <= now]
    statuses = Counter(r.status for r in window)
    live = {entry_id for ids in queued.values() for entry_id in ids}
    arrived = {r.id for r in window if r.arrived >= since}
    arrived.update(entry_id for entry_id in live if arrival_of(entry_id) >= since)
    upstreams: dict[str, Upstream] = {}
    failures: Counter[str] = Counter()
    for record in window:
        if record.status in ("failed", "expired"):
            failures[_EXPIRED_PREFIX.sub("expired: ", record.reply or "")] += 1
        if record.relay is None or record.status == "deleted":
            continue
        upstream = upstreams.setdefault(record.relay, Upstream())
        if record.status == "sent":
            upstream.sent += 1
            upstream.delays.append(record.delay)
        elif record.status == "failed":
            upstream.failed += 1
        else:
            upstream.expired += 1
    oldest = min(live, default=None)
    return Stats(
        since=since, now=now, received=len(arrived), sent=statuses["sent"],
        deferred_attempts=_deferrals(window, live, attempted, since),
        failed=statuses["failed"], expired=statuses["expired"], deleted=statuses["deleted"],
        delay=delay_of([r.delay for r in window if r.status == "sent"]),
        top_failures=failures.most_common(TOP_REPLIES), upstreams=upstreams,
        queue={queue.state: len(ids) for queue, ids in queued.items()},
        oldest=None if oldest is None else (oldest, arrival_of(oldest)))


def _deferrals(window: list[Record], live: set[str], attempted: list[Entry],
               since: float) -> int:
    count = 0
    for entry in attempted:
        times = [attempt.at for attempt in entry.attempts]
        if entry.queue is Queue.FAILED:
            times = times[:-1]  # its last attempt settled it
        count += sum(1 for at in times if at >= since)
    finished: dict[str, tuple[int, bool]] = {}  # id -> (attempts, did the last settle one)
    for record in window:
        if record.id in live:
            continue
        settled = record.status != "deleted"
        attempts, before = finished.get(record.id, (0, False))
        if record.attempts > attempts:
            finished[record.id] = (record.attempts, settled)
        elif record.attempts == attempts:
            finished[record.id] = (attempts, before or settled)
    return count + sum(attempts - settled for attempts, settled in finished.values())

"""`relay stats` figures computed from a known set of records and queue entries."""

from __future__ import annotations

import calendar

from relay.entry import Attempt, Entry, Queue, Recipient, Status
from relay.history import Record
from relay.report import stats_json, stats_text
from relay.stats import arrival_of, compute, percentile

NOW = calendar.timegm((2026, 12, 4, 12, 0, 0))
SINCE = NOW - 86400
UP_A, UP_B = "a.example:587", "b.example:587"


def qid(at: float, n: int = 0) -> str:
    return f"{int(at * 1_000_000):013X}{n:08X}"


def record(n: int, status: str = "sent", *, at: float = NOW - 100, delay: float = 1.0,
           relay: str | None = UP_A, reply: str = "250 ok", attempts: int = 1,
           arrived: float = NOW - 200, queue_id: str | None = None) -> Record:
    return Record(at=at, status=status, id=queue_id or qid(arrived, n), message_id=None,
                  sender="app@example.com", recipient=f"user{n}@example.net", size=100,
                  arrived=arrived, send_at=None, delay=delay, attempts=attempts, relay=relay,
                  reply=reply)


# Twenty sent with delays 1..20 s (ten through each upstream), two failed alike, one
# failed otherwise, one expired after 3 attempts, one deleted after 2, and one sent
# before the window (left out of everything).
RECORDS = [record(n, delay=float(n), relay=UP_A if n <= 10 else UP_B) for n in range(1, 21)]
RECORDS += [
    record(21, "failed", reply="550 5.1.1 <user21@example.net>: No such user", attempts=2),
    record(22, "failed", reply="550 5.1.1 <user21@example.net>: No such user"),
    record(23, "failed", reply="554 5.7.1 Spam", relay=UP_B),
    record(24, "expired", reply="expired after 3 attempts: 451 4.2.0 busy", attempts=3),
    record(25, "deleted", relay=None, reply="451 4.2.0 busy", attempts=2),
    record(26, at=SINCE - 10, arrived=SINCE - 20),
]
# The live queue: a deferred entry attempted twice in the window and once before it, a
# failed one whose last attempt settled it, one scheduled and one queued that arrived
# in the window, and the oldest, held since before it.
OLDEST = qid(SINCE - 5000)
DEFERRED, FAILED = qid(NOW - 3000, 1), qid(NOW - 3000, 2)
SCHEDULED, QUEUED = qid(NOW - 10, 3), qid(NOW - 5, 4)


def live_entry(entry_id: str, queue: Queue, times: list[float]) -> Entry:
    return Entry(id=entry_id, queue=queue, sender="app@example.com",
                 recipients=(Recipient("x@example.net", Status.PENDING),),
                 arrived=arrival_of(entry_id), size=10,
                 attempts=tuple(Attempt(t, UP_A, "451 busy", 0.1) for t in times))


QUEUED_IDS = {Queue.INCOMING: [QUEUED], Queue.ACTIVE: [], Queue.DEFERRED: [DEFERRED],
              Queue.HOLD: [OLDEST], Queue.FAILED: [FAILED], Queue.SCHEDULED: [SCHEDULED]}
ATTEMPTED = [live_entry(DEFERRED, Queue.DEFERRED, [SINCE - 60, NOW - 2000, NOW - 1000]),
             live_entry(FAILED, Queue.FAILED, [NOW - 2900, NOW - 2800])]


def stats():  # type: ignore[no-untyped-def]
    return compute(RECORDS, QUEUED_IDS, ATTEMPTED, SINCE, NOW)


def test_counts_of_each_outcome_in_the_window() -> None:
    """Sent, failed, expired and deleted recipients in the window; the earlier one left out."""
    figures = stats()
    assert (figures.sent, figures.failed, figures.expired, figures.deleted) == (20, 3, 1, 1)


def test_received_counts_messages_that_arrived_in_the_window_finished_or_queued() -> None:
    """25 finished (the one from before the window not among them), and the deferred,
    failed, scheduled and queued entries; the held one arrived before the window."""
    assert stats().received == 25 + 4


def test_deferred_attempts_from_queue_histories_and_finished_messages() -> None:
    """Deferred entry: 2 attempts in the window. Failed entry: 1 (its last settled it).
    Finished: failed-after-2 gives 1, expired-after-3 gives 2, deleted-after-2 gives 2."""
    assert stats().deferred_attempts == 2 + 1 + 1 + 2 + 2


def test_delay_percentiles_of_the_messages_sent() -> None:
    """Delays 1..20 s: p50 10, p95 19, p99 20, max 20 (nearest rank)."""
    delay = stats().delay
    assert delay is not None
    assert (delay.p50, delay.p95, delay.p99, delay.max) == (10.0, 19.0, 20.0, 20.0)


def test_top_failure_replies_commonest_first_with_expiry_grouped() -> None:
    """Failed and expired replies counted, commonest first, expiry's attempt count dropped."""
    assert stats().top_failures == [
        ("550 5.1.1 <user21@example.net>: No such user", 2),
        ("554 5.7.1 Spam", 1),
        ("expired: 451 4.2.0 busy", 1),
    ]


def test_figures_per_upstream() -> None:
    """Sent, failed and expired per upstream, with its own delays."""
    upstreams = stats().upstreams
    assert set(upstreams) == {UP_A, UP_B}
    a, b = upstreams[UP_A], upstreams[UP_B]
    assert (a.sent, a.failed, a.expired, b.sent, b.failed, b.expired) == (10, 2, 1, 10, 1, 0)
    assert a.delay is not None and (a.delay.p50, a.delay.max) == (5.0, 10.0)
    assert b.delay is not None and (b.delay.p50, b.delay.max) == (15.0, 20.0)


def test_queue_by_state_and_its_oldest_entry() -> None:
    """The live queue by state, and the entry with the earliest arrival."""
    figures = stats()
    assert figures.queue == {"queued": 1, "active": 0, "deferred": 1, "held": 1, "failed": 1,
                             "scheduled": 1}
    assert figures.oldest == (OLDEST, arrival_of(OLDEST))


def test_an_empty_window_has_no_delay_and_no_oldest_entry() -> None:
    """Nothing sent and nothing queued: zeros, and no delay or oldest entry."""
    empty = compute([], {queue: [] for queue in Queue}, [], SINCE, NOW)
    assert (empty.received, empty.sent, empty.delay, empty.oldest) == (0, 0, None, None)


def test_nearest_rank_percentiles() -> None:
    """Nearest rank: p25, p50, p75 and p100 of 1..4 are 1, 2, 3 and 4."""
    assert [percentile([1.0, 2.0, 3.0, 4.0], f) for f in (0.25, 0.5, 0.75, 1.0)] == [
        1.0, 2.0, 3.0, 4.0]
    assert percentile([7.0], 0.99) == 7.0


def test_text_and_json_redact_addresses_in_replies_when_asked() -> None:
    """With redaction, no address appears in full in either form."""
    figures = stats()
    assert "u***@example.net" in stats_text(figures, redact=True)
    assert "user21@example.net" not in stats_text(figures, redact=True)
    shown = stats_json(figures, redact=True)
    assert shown["top_failures"][0] == {"reply": "550 5.1.1 <u***@example.net>: No such user",
                                        "count": 2}
    assert shown["delay"] == {"p50": 10.0, "p95": 19.0, "p99": 20.0, "max": 20.0}
    assert shown["oldest"]["id"] == OLDEST
    assert "user21@example.net" in stats_text(figures, redact=False)


def test_arrival_time_is_read_from_the_queue_id() -> None:
    """A queue ID begins with its arrival in microseconds (relay.spool.new_id)."""
    from relay.spool import new_id
    assert arrival_of(new_id(NOW + 0.25)) == NOW + 0.25

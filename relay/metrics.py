"""The relay's Prometheus metrics: their names, types and labels (part of the contract,
docs/CONTRACT.md), and what counts them.

`Recorder` is what the listener, delivery and bounces call; it records nothing, so a
relay without `metrics.port` pays one empty call per event. `Metrics` records, on a
registry of its own (tests make fresh ones) with the library's process collector for
the `process_*` metrics. Counting stays off the hot path's bill: label children are
bound once, so a message costs an increment and an observation, nothing allocated; the
queue gauges and free space are read from the spool when Prometheus scrapes, never
kept up to date per message.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import policy
from .entry import Entry, Queue, Status
from .outcome import SET_UP, AttemptResult, Stage
from .spool import Spool

# Final dot to 250: a fsync or two, well under a millisecond to a few on a busy disk.
ACCEPT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0)
# Arrival to sent: from the first attempt's milliseconds to a backlog's days.
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                 3600.0, 14400.0, 86400.0, 432000.0)
OUTCOMES = ("sent", "deferred", "failed", "expired")
QUEUE_STATES = tuple(queue.state for queue in Queue)

# A `_created` series beside every counter and histogram doubles the text Prometheus
# reads, for a start time that process_start_time_seconds already gives.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in the library


class Refusal(str, enum.Enum):
    """The `reason` label of relay_messages_refused_total: why a message (or the session
    that would have carried it) was not accepted."""

    ALLOW = "allow"  # client not in listen.allow (554 5.7.1 at connect)
    CONNECTIONS = "connections"  # over listen.max_connections (421 4.7.0 at connect)
    ADDRESS = "address"  # sender or recipient refused (553 5.1.3)
    SIZE = "size"  # over listen.max_message_size (552 5.3.4)
    DISK = "disk"  # below spool.min_free or a spool write failed (452 4.3.1)
    PROTOCOL = "protocol"  # a client that broke the rules: too many commands, garbage (421/502)
    TIMEOUT = "timeout"  # idle past listen.timeout (421 4.4.2)
    ERROR = "error"  # a bug of ours (451 4.3.0)


class BounceOutcome(str, enum.Enum):
    """The `outcome` label of relay_bounces_total."""

    QUEUED = "queued"
    RATE_LIMITED = "rate_limited"
    FAILED = "failed"  # could not be stored (disk full, say)


class Recorder:
    """The calls the relay makes as things happen. This one records nothing: metrics off."""

    # --- listener side -----------------------------------------------------------------

    def accepted(self, seconds: float) -> None:
        """One message answered 250, `seconds` after its final dot arrived."""

    def refused(self, reason: Refusal) -> None:
        """One message or session not accepted, for `reason`."""

    # --- delivery side -----------------------------------------------------------------

    def answered(self, upstream: str, result: AttemptResult) -> None:
        """`upstream` was tried (its session and the transaction): whether it is up, and
        its errors. Also for an attempt it failed, which the next upstream then took."""

    def attempted(self, upstream: str, before: Entry, after: Entry, now: float) -> None:
        """One delivery attempt at `upstream` settled: `before` and `after` are the entry
        around it."""

    def upstreams(self, names: list[str]) -> None:
        """The configured upstreams' names (at start and after each reload)."""

    def paused(self, upstream: str, paused: bool) -> None:
        """An upstream paused (credentials rejected) or resumed."""

    def bounce(self, outcome: BounceOutcome) -> None:
        """A bounce notice queued, or not."""


class Metrics(Recorder):
    """The metrics of one relay on a registry of their own; `spool` is read at scrape time
    for the queue gauges, with `clock` for the age of the oldest message."""

    def __init__(self, spool: Spool, clock: Callable[[], float]) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        received = Counter("relay_messages_received", "Messages accepted (answered 250).",
                           registry=registry)
        refused = Counter("relay_messages_refused", "Messages or sessions refused, by reason.",
                          ["reason"], registry=registry)
        accept = Histogram("relay_accept_seconds", "Seconds from a message's final dot to "
                           "its 250.", buckets=ACCEPT_BUCKETS, registry=registry)
        self._deliveries = Counter("relay_deliveries", "Recipients' delivery outcomes per "
                                   "attempt: sent, deferred, failed (refused), expired.",
                                   ["upstream", "outcome"], registry=registry)
        self._delay = Histogram("relay_delivery_delay_seconds", "Seconds from a message's "
                                "arrival to its being sent, per recipient sent.",
                                buckets=DELAY_BUCKETS, registry=registry)
        self._up = Gauge("relay_upstream_up", "1 if the last attempt reached the upstream "
                         "and it answered in SMTP, 0 if it could not be reached.",
                         ["upstream"], registry=registry)
        self._paused = Gauge("relay_upstream_paused", "1 while delivery is paused because "
                             "the upstream rejected the credentials.", ["upstream"],
                             registry=registry)
        self._errors = Counter("relay_upstream_errors", "Attempts that ended in an error, "
                               "and recipients refused, by SMTP stage.",
                               ["upstream", "stage"], registry=registry)
        bounces = Counter("relay_bounces", "Bounce notices, by outcome.", ["outcome"],
                          registry=registry)
        registry.register(_SpoolCollector(spool, clock))
        # Bound once: the listener's calls go straight to the library's increment.
        self._received = received.inc
        self._observe_accept = accept.observe
        self._refused = {reason: refused.labels(reason.value).inc for reason in Refusal}
        self._bounces = {outcome: bounces.labels(outcome.value).inc for outcome in BounceOutcome}
        self._names: list[str] = []  # the configured upstreams
        self._bound: dict[str, _Bound] = {}  # each upstream's children, bound once
        self._observe_delay = self._delay.observe

    def accepted(self, seconds: float) -> None:
        self._received()
        self._observe_accept(seconds)

    def refused(self, reason: Refusal) -> None:
        self._refused[reason]()

    def answered(self, upstream: str, result: AttemptResult) -> None:
        for reply in result.recipients.values():
            if not ((reply.code is not None and 200 <= reply.code < 300)
                    or policy.is_recipient_limit(reply)):
                self._errors.labels(upstream, Stage.RCPT.value).inc()
        error = result.error
        if error is not None:
            self._errors.labels(upstream, result.stage.value).inc()
        unreachable = (error is not None and error.code is None and not result.recipients
                       and result.stage in SET_UP)
        self._bind(upstream).set_up(0 if unreachable else 1)

    def attempted(self, upstream: str, before: Entry, after: Entry, now: float) -> None:
        bound = self._bind(upstream)
        for old, new in zip(before.recipients, after.recipients, strict=True):
            if old.status is not Status.PENDING:
                continue
            if new.status is Status.SENT:
                bound.counted["sent"]()
                self._observe_delay(max(now - after.arrived, 0.0))
            elif new.status is Status.PENDING:
                bound.counted["deferred"]()
            elif policy.is_expiry(new.reply):
                bound.counted["expired"]()
            else:
                bound.counted["failed"]()

    def _bind(self, upstream: str) -> _Bound:
        bound = self._bound.get(upstream)
        if bound is None:
            bound = self._bound[upstream] = _Bound(
                {outcome: self._deliveries.labels(upstream, outcome).inc for outcome in OUTCOMES},
                self._up.labels(upstream).set)  # the up gauge exists from the first attempt
        return bound

    def upstreams(self, names: list[str]) -> None:
        """Forget the gauges of upstreams no longer configured (an old provider must not
        stay down), and show each configured one's paused gauge, 0 until a pause."""
        for gone in set(self._names).difference(names):
            self._bound.pop(gone, None)
            for gauge in (self._up, self._paused):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._names = list(names)
        for name in names:
            self._paused.labels(name)

    def paused(self, upstream: str, paused: bool) -> None:
        self._paused.labels(upstream).set(1 if paused else 0)

    def bounce(self, outcome: BounceOutcome) -> None:
        self._bounces[outcome]()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the Accept header asks for (Prometheus text by
        default), and its content type. Lists the spool's directories: call it from a
        thread, not the event loop."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


@dataclass(frozen=True)
class _Bound:
    """One upstream's delivery counters and up gauge, bound to its label once."""

    counted: dict[str, Callable[[], None]]
    set_up: Callable[[float], None]


class _SpoolCollector(Collector):
    """The queue gauges and free space, taken from the spool at each scrape."""

    def __init__(self, spool: Spool, clock: Callable[[], float]) -> None:
        self._spool = spool
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return self._families(None, None, 0)

    def collect(self) -> Iterable[Metric]:
        counts, oldest = self._spool.census()
        return self._families(counts, oldest, self._spool.free_bytes())

    def _families(self, counts: dict[str, int] | None, oldest: float | None,
                  free: int) -> list[Metric]:
        queue = GaugeMetricFamily("relay_queue_messages", "Messages in the spool, by state.",
                                  labels=["state"])
        for state in QUEUE_STATES if counts is not None else ():
            queue.add_metric([state], counts[state] if counts is not None else 0)
        age = 0.0 if oldest is None else max(self._clock() - oldest, 0.0)
        return [
            queue,
            GaugeMetricFamily("relay_queue_oldest_age_seconds", "Age of the oldest message "
                              "still to be delivered (queued, active or deferred); 0 if none.",
                              value=age),
            GaugeMetricFamily("relay_spool_free_bytes", "Free bytes on the spool's "
                              "filesystem.", value=free),
        ]

"""Which upstream carries a message: its route, the choice for one attempt, the aftermath.

A message's route is the configured upstreams whose `sender_domains` include its
sender's domain, or that have none, in the order given. Each attempt goes to the first
upstream of the route that is not down (relay.breaker), once its rate allows
(relay.ratelimit): waiting for a rate is not a reason to take the next upstream, a
failure of the upstream is. Pure: no I/O, `now` and random numbers are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .breaker import Breaker, trips
from .config import AnyUpstream, DeliveryConfig
from .configvalues import canonical_domain
from .outcome import AttemptResult, Reaction, Reply
from .policy import credentials_rejected
from .ratelimit import Bucket, rate_limited

WAITING_FOR_RATE = "waiting for rate"  # how `relay queue` shows a message's wait for it


def sender_domain(sender: str) -> str | None:
    """The envelope sender's domain as upstreams list theirs; None for the null sender <>."""
    local, at, domain = sender.rpartition("@")
    return canonical_domain(domain) if at and local and domain else None


def route(upstreams: Sequence[AnyUpstream], sender: str) -> tuple[AnyUpstream, ...]:
    """The upstreams that carry mail from `sender`, in order of preference. The null
    sender has no domain: only upstreams without sender_domains carry it."""
    domain = sender_domain(sender)
    return tuple(u for u in upstreams if not u.sender_domains or domain in u.sender_domains)


def refusal(upstreams: Sequence[AnyUpstream], sender: str) -> Reply | None:
    """The reply to MAIL FROM for a sender that no upstream carries, naming its domain;
    None when one does. With no upstream configured at all, mail is accepted and kept
    until one is, as before routing existed."""
    if not upstreams or route(upstreams, sender):
        return None
    domain = sender_domain(sender)
    if domain is None:
        return Reply(553, "5.7.1 No upstream relays mail from the null sender <>")
    return Reply(553, f"5.7.1 No upstream relays mail from the domain {domain}")


@dataclass(frozen=True)
class Gate:
    """What the relay knows of one upstream at run time: is it up, may the next go."""

    breaker: Breaker = field(default_factory=Breaker)
    bucket: Bucket = field(default_factory=Bucket)


@dataclass(frozen=True)
class Choice:
    """The upstream for this attempt and its gate once the attempt is let through (to be
    stored); or, with no upstream, how long until one may take the message, and why."""

    upstream: AnyUpstream | None
    gate: Gate | None = None
    wait: float = 0.0
    why: str = ""
    turn: AnyUpstream | None = None  # waiting for rate: the upstream that takes it then


def choose(path: Sequence[AnyUpstream], gates: Mapping[str, Gate], now: float,
           grace: float, turn: str | None = None) -> Choice:
    """The first upstream of the route (`path`) that is up, if its rate lets a message go
    now. `gates` is keyed by upstream name (a missing one is up, with a full bucket);
    `grace` is how long a probe may take before another is let through (Breaker.admit).
    `turn` names an upstream whose rate this message already took its turn of (reserve):
    it goes there without asking the bucket again."""
    soonest: float | None = None
    for upstream in path:
        gate = gates.get(upstream.name, Gate())
        admitted = gate.breaker.admit(now, grace)
        if admitted is None:
            soonest = gate.breaker.until if soonest is None else min(soonest, gate.breaker.until)
            continue
        if upstream.name == turn:
            return Choice(upstream, Gate(admitted, gate.bucket))
        wait = gate.bucket.wait(upstream.rate, now)
        if wait > 0:
            return Choice(None, wait=wait, why=f"{WAITING_FOR_RATE} ({upstream.name})",
                          turn=upstream)
        return Choice(upstream, Gate(admitted, gate.bucket.take(upstream.rate, now)))
    if soonest is None:
        return Choice(None, why="no upstream relays mail from this sender")
    return Choice(None, wait=max(soonest - now, 0.0), why="every upstream of its route is down")


def reserve(gate: Gate, upstream: AnyUpstream, now: float) -> Gate:
    """The gate once a message waiting for the upstream's rate has taken its turn now:
    the next message's wait is one interval longer (Bucket.take)."""
    return Gate(gate.breaker, gate.bucket.take(upstream.rate, now))


def react(gate: Gate, result: AttemptResult, now: float, config: DeliveryConfig,
          rand: float) -> tuple[Gate, Reaction]:
    """The upstream's gate after this attempt, and what becomes of the message.

    REQUEUE: recipients the result reports sent stay sent, the others stay pending, and
    the upstream is paused for retry_min. FAILOVER: the upstream is down for its backoff;
    with no further upstream in the route the message is settled (deferred) instead."""
    if rate_limited(result) is not None:
        return Gate(gate.breaker.succeeded(), gate.bucket.pause(now + config.retry_min)), \
            Reaction.REQUEUE
    if trips(result):
        reason = str(result.error)
        breaker = gate.breaker.failed(now, reason, config, rand,
                                      paused=credentials_rejected(result))
        return Gate(breaker, gate.bucket), Reaction.FAILOVER
    return Gate(gate.breaker.succeeded(), gate.bucket), Reaction.SETTLE

"""One delivery attempt of one entry over its route: which upstream takes it, failover to
the next when one fails, and waiting for an upstream's rate.

The route is the upstreams that carry the sender's domain (relay.routing). The first of
them that is up takes the message once its rate allows; a short wait for the rate is
waited here, a longer one puts the message back with its turn taken. When the upstream
itself fails (unreachable, TLS, AUTH; relay.breaker) the next one of the route takes the
message at once, the failed attempt kept in its history. This module decides and sends;
relay.delivery records what it returns. On the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from . import policy, routing
from .config import AnyUpstream, DeliveryConfig
from .entry import Entry
from .log import log_event
from .metrics import Recorder
from .outcome import AttemptOutcome, Disposition, Limited, Reaction, Tried, Waiting
from .ratelimit import rate_limited
from .upstreamconfig import TIMEOUT
from .upstreams import Upstreams, display

# A message whose upstream's rate lets it go within this many seconds waits for it in its
# worker; a longer wait puts it back in the queue with its turn taken, and frees the worker.
RATE_HOLD = 1.0
# A probe of a down upstream may be out this many of its timeouts before another is let
# through: longer than an attempt can take (connect, greeting, then a command at a time).
PROBE_TIMEOUTS = 4


class Attempter:
    """Makes attempts over the upstreams' shared state (relay.upstreams)."""

    def __init__(self, upstreams: Upstreams, config: DeliveryConfig, metrics: Recorder,
                 clock: Callable[[], float], rand: Callable[[], float]) -> None:
        self.upstreams = upstreams
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._rand = rand
        # Messages put back with a turn of an upstream's rate taken: name and when.
        self._turns: dict[str, tuple[str, float]] = {}

    async def attempt(self, entry: Entry, content: bytes,
                      route: tuple[AnyUpstream, ...]) -> AttemptOutcome:
        now = self._clock()
        turn = self._turns.pop(entry.id, None)
        if turn is not None and turn[1] > now:
            # Flushed before its turn: the provider's rate stands all the same.
            self._turns[entry.id] = turn
            return Waiting(entry, turn[1], f"{routing.WAITING_FOR_RATE} ({turn[0]})", False)
        taken = turn[0] if turn is not None else None
        tried: list[str] = []
        last: Tried | None = None
        while True:
            now = self._clock()
            path = [u for u in route if u.name not in tried]
            choice = routing.choose(path, self.upstreams.gates, now, self._grace(path), taken)
            if choice.upstream is None and choice.turn is None:
                if last is not None:
                    return last  # failed over as far as the route goes: settled as it is
                if not route:
                    return Waiting(entry, now + self.config.retry_max, choice.why, True)
                # Every upstream of the route is down: back when the first may be tried,
                # or after retry_min if that is sooner (a probe out for another message
                # may bring it back before its grace runs out).
                until = now + min(choice.wait, self.config.retry_min)
                return Waiting(entry, until, choice.why, record=False)
            if choice.upstream is None:
                assert choice.turn is not None
                upstream, taken = choice.turn, choice.turn.name
                self.upstreams.set_gate(upstream.name, routing.reserve(
                    self.upstreams.gates[upstream.name], upstream, now))
                if choice.wait > RATE_HOLD:
                    self._turns[entry.id] = (upstream.name, now + choice.wait)
                    return Waiting(entry, now + choice.wait,
                                   choice.why, record=True)
                await asyncio.sleep(choice.wait)
                continue
            sent, reaction = await self._send(choice, entry, content)
            if isinstance(sent, Limited) or reaction is not Reaction.FAILOVER:
                return sent  # the upstream answered: the usual rules settle the message
            last = sent
            settled = policy.settle(entry, last.result, last.started, self._clock(),
                                    self.config, self._rand())
            if settled.disposition is not Disposition.DEFERRED:
                return last
            # The upstream failed: the next of the route takes the message at once.
            log_event(logging.WARNING, entry.id, relay=last.result.relay, status="failover",
                      reply=str(last.result.error))
            entry, taken = replace(settled.entry, next_attempt=None), None
            tried.append(last.upstream)

    async def _send(self, choice: routing.Choice, entry: Entry,
                    content: bytes) -> tuple[Tried | Limited, Reaction]:
        upstream = choice.upstream
        assert upstream is not None and choice.gate is not None
        self.upstreams.set_gate(upstream.name, choice.gate)
        started = self._clock()
        pending = [r.address for r in entry.pending]
        async with self.upstreams.transport(upstream) as transport:
            result = await transport.deliver(entry.sender, pending, content, entry.smtputf8)
        result = replace(result, relay=display(upstream))
        self.metrics.answered(upstream.name, result)
        gate, reaction = routing.react(self.upstreams.gates[upstream.name], result,
                                       self._clock(), self.config, self._rand())
        self.upstreams.set_gate(upstream.name, gate)
        if reaction is Reaction.REQUEUE:
            reply = rate_limited(result)
            assert reply is not None
            limited = Limited(entry, result, reply, gate.bucket.paused_until, upstream.name)
            return limited, reaction
        return Tried(entry, result, started, upstream.name), reaction

    def _grace(self, path: list[AnyUpstream]) -> float:
        """How long a probe of a down upstream may be out before another is let through:
        longer than any attempt can take."""
        return PROBE_TIMEOUTS * max((u.timeout for u in path), default=TIMEOUT)

"""The circuit breaker of one upstream: which failures mark it down, and when it is tried again.

A failure of the upstream itself (unreachable, TLS, AUTH rejected, a 421 at connect; for
the API a connection error, 401/403 or 5xx) opens the circuit: the upstream is down for
a backoff of its own, and the next upstream in the route takes the message at once.
After the backoff one attempt goes through as a probe (half-open); its success closes
the circuit, its failure opens it for a longer backoff. Replies about the message itself
never trip it. Pure: no I/O, `now` and the jitter's random number are arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .config import DeliveryConfig
from .outcome import SET_UP, AttemptResult, Stage
from .policy import backoff
from .ratelimit import is_rate_limit


class Circuit(enum.Enum):
    CLOSED = "up"
    OPEN = "down"
    HALF_OPEN = "probing"


@dataclass(frozen=True)
class Breaker:
    """One upstream's circuit. OPEN: down until `until`. HALF_OPEN: a probe is out, and
    another may go at `until` if that one never reports."""

    circuit: Circuit = Circuit.CLOSED
    trips: int = 0  # consecutive failures, for the backoff
    until: float = 0.0
    reason: str = ""  # the failure that opened it, for `relay queue` and the log
    paused: bool = False  # opened because the credentials were rejected

    def admit(self, now: float, grace: float) -> Breaker | None:
        """The breaker after letting one attempt go now, or None if the upstream is down.
        An attempt let through an open circuit is its probe; a probe that has not reported
        after `grace` seconds (a worker that died with it) is replaced by the next one."""
        if self.circuit is Circuit.CLOSED:
            return self
        if now < self.until:
            return None
        return replace(self, circuit=Circuit.HALF_OPEN, until=now + grace)

    def succeeded(self) -> Breaker:
        """The upstream answered as a working server does: the circuit closes."""
        return Breaker()

    def failed(self, now: float, reason: str, config: DeliveryConfig, rand: float,
               paused: bool = False) -> Breaker:
        """The upstream failed: down for retry_min, doubling with each failure in a row up
        to retry_max, with the same jitter as a message's retries. Rejected credentials
        (`paused`) hold it for retry_max at once: every login would meet the same refusal
        until the operator fixes them and reloads."""
        trips = self.trips + 1
        hold = config.retry_max if paused else backoff(trips, config, rand)
        return Breaker(Circuit.OPEN, trips, now + hold, reason, paused)

    def describe(self, now: float) -> str:
        """`up`, `down for 42s (reason)` or `probing`: the state as operators see it."""
        if self.circuit is Circuit.OPEN:
            state = "paused" if self.paused else "down"
            return f"{state} for {max(self.until - now, 0.0):.0f}s ({self.reason})"
        return "probing" if self.circuit is Circuit.HALF_OPEN else "up"


def trips(result: AttemptResult) -> bool:
    """A failure of the upstream, not of the message: an error while setting it up or at AUTH.
    That is connect, TLS, EHLO and AUTH (and a session closed before its first command,
    which relay.link reports at SESSION); the API's connection errors, 401/403/404 and
    5xx, which relay.mailgun reports there. A provider's rate limiting is not one."""
    error = result.error
    return (error is not None and (result.stage in SET_UP or result.stage is Stage.AUTH)
            and not is_rate_limit(error))

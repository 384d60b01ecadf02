"""The circuit breaker per upstream: what trips it, its backoff, the probe, the recovery."""

from __future__ import annotations

import pytest

from relay.breaker import Breaker, Circuit, trips
from relay.config import DeliveryConfig
from relay.outcome import AttemptResult, Reply, Stage

CONFIG = DeliveryConfig(retry_min=60, retry_max=3600)
T0 = 1_800_000_000.0
GRACE = 300.0


def result(code: int | None, text: str, stage: Stage) -> AttemptResult:
    return AttemptResult("up", error=Reply(code, text), stage=stage)


@pytest.mark.parametrize("attempt, tripped", [
    (result(None, "connection failed: [Errno 111] Connection refused", Stage.SESSION), True),
    (result(None, "TLS failure: certificate verify failed", Stage.SESSION), True),
    (result(None, "timed out: no greeting", Stage.SESSION), True),
    (result(421, "4.3.2 Service not available, closing", Stage.SESSION), True),
    (result(535, "5.7.8 Authentication failed", Stage.AUTH), True),
    (result(454, "4.7.0 Temporary authentication failure", Stage.AUTH), True),
    (result(451, "4.3.0 Mailgun API HTTP 503: unavailable", Stage.SESSION), True),
    (result(421, "4.7.0 rate limited, try later", Stage.SESSION), False),
    (result(550, "5.1.1 No such user", Stage.RCPT), False),
    (result(451, "4.3.0 try again", Stage.DATA), False),
    (result(553, "5.1.8 bad sender", Stage.MAIL), False),
    (result(554, "5.6.0 Mailgun API HTTP 400: to parameter is not a valid address",
            Stage.DATA), False),
    (result(None, "timed out: no reply from the Mailgun API", Stage.DATA), False),
    (AttemptResult("up", recipients={"a@x.example": Reply(250, "2.0.0 Ok")}), False),
])
def test_what_trips_the_breaker(attempt: AttemptResult, tripped: bool) -> None:
    """Failures of the upstream trip it; replies about the message and rate limits never."""
    assert trips(attempt) is tripped


def test_a_closed_breaker_lets_every_attempt_through() -> None:
    assert Breaker().admit(T0, GRACE) == Breaker()


@pytest.mark.parametrize("failures, low, high", [
    (1, 60, 72), (2, 96, 144), (3, 192, 288), (10, 2880, 3600),
])
def test_down_for_a_backoff_that_doubles_per_failure(failures: int, low: float,
                                                     high: float) -> None:
    """Down for retry_min after the first failure, doubling to retry_max, jittered."""
    breaker = Breaker()
    for _ in range(failures):
        breaker = breaker.failed(T0, "refused", CONFIG, 0.5)
    assert breaker.circuit is Circuit.OPEN and breaker.trips == failures
    assert low <= breaker.until - T0 <= high
    assert breaker.admit(breaker.until - 0.001, GRACE) is None


def test_after_the_backoff_one_probe_goes_and_others_wait() -> None:
    """Half-open: one attempt goes through as the probe; the next is held back."""
    down = Breaker().failed(T0, "refused", CONFIG, 0.5)
    probing = down.admit(down.until, GRACE)
    assert probing is not None and probing.circuit is Circuit.HALF_OPEN
    assert probing.admit(down.until + 1, GRACE) is None


def test_a_probe_that_never_reports_is_replaced_after_the_grace() -> None:
    """A probe lost with its worker does not keep the upstream out of use forever."""
    down = Breaker().failed(T0, "refused", CONFIG, 0.5)
    probing = down.admit(down.until, GRACE)
    assert probing is not None
    assert probing.admit(down.until + GRACE, GRACE) is not None


def test_a_successful_probe_closes_the_circuit() -> None:
    down = Breaker().failed(T0, "refused", CONFIG, 0.5).failed(T0, "refused", CONFIG, 0.5)
    probing = down.admit(down.until, GRACE)
    assert probing is not None
    assert probing.succeeded() == Breaker()


def test_a_failed_probe_opens_it_for_longer() -> None:
    down = Breaker().failed(T0, "refused", CONFIG, 0.5)
    probing = down.admit(down.until, GRACE)
    assert probing is not None
    again = probing.failed(down.until, "refused", CONFIG, 0.5)
    assert again.circuit is Circuit.OPEN and again.until - down.until > down.until - T0


@pytest.mark.parametrize("breaker, text", [
    (Breaker(), "up"),
    (Breaker(Circuit.OPEN, 1, T0 + 42, "connection failed: refused"),
     "down for 42s (connection failed: refused)"),
    (Breaker(Circuit.HALF_OPEN, 1, T0 + GRACE, "refused"), "probing"),
])
def test_describe(breaker: Breaker, text: str) -> None:
    """The state as `relay queue` and `relay check` would show it."""
    assert breaker.describe(T0) == text

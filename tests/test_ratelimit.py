"""The token bucket per upstream, and which provider replies are rate limiting."""

from __future__ import annotations

import pytest

from relay.config import Rate
from relay.outcome import AttemptResult, Reply, Stage
from relay.ratelimit import Bucket, is_rate_limit, rate_limited

T0 = 1_800_000_000.0
TEN_A_SECOND = Rate(10, 1.0)


def sends(rate: Rate, times: list[float]) -> list[float]:
    """When each message goes if every one is given its turn at `times[i]` and takes it."""
    bucket, went = Bucket(), []
    for now in times:
        at = now + bucket.wait(rate, now)
        bucket = bucket.take(rate, now)
        went.append(round(at - T0, 6))
    return went


@pytest.mark.parametrize("rate, times, expected", [
    (TEN_A_SECOND, [T0] * 4, [0.0, 0.1, 0.2, 0.3]),
    (Rate(300, 3600.0), [T0, T0], [0.0, 12.0]),
    (TEN_A_SECOND, [T0, T0 + 0.05, T0 + 1.0], [0.0, 0.1, 1.0]),
    (TEN_A_SECOND, [T0, T0 + 5.0, T0 + 5.0], [0.0, 5.0, 5.1]),
])
def test_messages_go_evenly_spaced(rate: Rate, times: list[float], expected: list[float]) -> None:
    """One token: N per period, one every period/N, and an idle bucket never bursts."""
    assert sends(rate, times) == expected


def test_a_hundred_at_ten_a_second_take_nine_point_nine_seconds() -> None:
    """The issue's benchmark figure (100 messages in 9.5-11 s) follows from the bucket."""
    assert sends(TEN_A_SECOND, [T0] * 100)[-1] == pytest.approx(9.9)


def test_wait_tells_without_taking() -> None:
    bucket = Bucket().take(TEN_A_SECOND, T0)
    assert bucket.wait(TEN_A_SECOND, T0 + 0.04) == pytest.approx(0.06)
    assert bucket.wait(TEN_A_SECOND, T0 + 0.04) == pytest.approx(0.06)
    assert bucket.wait(TEN_A_SECOND, T0 + 0.1) == 0.0


@pytest.mark.parametrize("rate", [None, TEN_A_SECOND])
def test_a_pause_holds_every_message_until_it_ends(rate: Rate | None) -> None:
    """A provider's rate limiting pauses the upstream, with or without a rate of ours."""
    bucket = Bucket().pause(T0 + 60)
    assert bucket.wait(rate, T0) == 60.0
    assert bucket.wait(rate, T0 + 60) == 0.0


def test_a_shorter_pause_does_not_cut_a_longer_one() -> None:
    assert Bucket().pause(T0 + 60).pause(T0 + 10).paused_until == T0 + 60


def test_no_rate_means_no_wait() -> None:
    bucket = Bucket()
    for _ in range(1000):
        bucket = bucket.take(None, T0)
    assert bucket.wait(None, T0) == 0.0


@pytest.mark.parametrize("reply, limited", [
    (Reply(421, "4.7.0 Try again later, closing connection"), True),
    (Reply(451, "4.7.1 Please try again later"), True),
    (Reply(421, "Rate limited: too many messages in the last hour"), True),
    (Reply(451, "Too many messages, slow down"), True),
    (Reply(451, "4.3.0 Domain sending rate exceeded"), True),
    (Reply(451, "4.7.0 Mailgun API HTTP 429: rate limit exceeded"), True),
    (Reply(421, "4.4.2 idle too long"), False),
    (Reply(451, "4.3.0 Internal error, please separate the parts"), False),
    (Reply(452, "4.5.3 Too many recipients"), False),
    (Reply(454, "4.7.0 TLS not available"), False),
    (Reply(550, "5.7.1 rate limited forever"), False),
    (Reply(None, "connection failed: rate"), False),
])
def test_rate_limit_replies(reply: Reply, limited: bool) -> None:
    """421/451 with 4.7.x, or "rate"/"too many" as words; other codes never."""
    assert is_rate_limit(reply) is limited


@pytest.mark.parametrize("result, reply", [
    (AttemptResult("up", error=Reply(421, "4.7.0 slow down"), stage=Stage.SESSION),
     Reply(421, "4.7.0 slow down")),
    (AttemptResult("up", recipients={"a@x.example": Reply(250, "2.0.0 Ok"),
                                     "b@x.example": Reply(451, "4.7.1 rate exceeded")}),
     Reply(451, "4.7.1 rate exceeded")),
    (AttemptResult("up", error=Reply(451, "4.3.0 try later"), stage=Stage.DATA), None),
    (AttemptResult("up", recipients={"a@x.example": Reply(250, "2.0.0 Ok")}), None),
])
def test_rate_limited_finds_the_reply_in_an_attempt(result: AttemptResult,
                                                    reply: Reply | None) -> None:
    """The error that ended the attempt, or any recipient's reply, can be the limit."""
    assert rate_limited(result) == reply

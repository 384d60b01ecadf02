"""The pure decisions: classification, backoff, expiry, and settling an entry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import DeliveryConfig
from relay.entry import Entry, Queue, Recipient, Status
from relay.outcome import AttemptResult, Disposition, Reply, Stage, Verdict
from relay.policy import (
    await_upstream,
    backoff,
    classify,
    credentials_rejected,
    is_expired,
    settle,
)

CONFIG = DeliveryConfig(retry_min=60, retry_max=3600, max_age=5 * 86400, max_attempts=None)
T0 = 1_800_000_000.0


def entry(*addresses: str, attempts: int = 0) -> Entry:
    from relay.entry import Attempt
    return Entry(id="0" * 21, queue=Queue.ACTIVE, sender="app@example.com",
                 recipients=tuple(Recipient(a) for a in addresses), arrived=T0, size=10,
                 attempts=tuple(Attempt(T0, "up:587", "451 x", 0.1) for _ in range(attempts)))


@pytest.mark.plan(58, 68)
@pytest.mark.parametrize("reply, stage, verdict", [
    (Reply(250, "2.0.0 Ok"), Stage.DATA, Verdict.SENT),
    (Reply(251, "2.1.5 will forward"), Stage.RCPT, Verdict.SENT),
    (Reply(550, "5.1.1 no such user"), Stage.RCPT, Verdict.PERMANENT),
    (Reply(554, "5.6.0 content rejected"), Stage.DATA, Verdict.PERMANENT),
    (Reply(553, "5.1.8 bad sender"), Stage.MAIL, Verdict.PERMANENT),
    (Reply(451, "4.3.0 later"), Stage.DATA, Verdict.TEMPORARY),
    (Reply(421, "4.7.0 closing"), Stage.SESSION, Verdict.TEMPORARY),
    (Reply(535, "5.7.8 bad credentials"), Stage.AUTH, Verdict.TEMPORARY),
    (Reply(452, "4.5.3 too many recipients"), Stage.RCPT, Verdict.TEMPORARY),
    (Reply(552, "5.5.3 too many recipients"), Stage.RCPT, Verdict.TEMPORARY),
    (Reply(552, "5.2.2 mailbox full"), Stage.RCPT, Verdict.PERMANENT),
    (Reply(554, "5.7.1 go away"), Stage.SESSION, Verdict.TEMPORARY),
    (Reply(None, "connection failed: refused"), Stage.SESSION, Verdict.TEMPORARY),
    (Reply(None, "timed out"), Stage.DATA, Verdict.TEMPORARY),
])
def test_classification_table(reply: Reply, stage: Stage, verdict: Verdict) -> None:
    """2xx sent, 5xx to MAIL/RCPT/DATA permanent, everything else temporary."""
    assert classify(reply, stage) is verdict


@pytest.mark.parametrize("result, paused", [
    (AttemptResult("up:587", error=Reply(535, "5.7.8 bad credentials"), stage=Stage.AUTH), True),
    (AttemptResult("up:587", error=Reply(454, "4.7.0 try later"), stage=Stage.AUTH), False),
    (AttemptResult("up:587", error=Reply(554, "5.7.1 go away"), stage=Stage.SESSION), False),
    (AttemptResult("up:587", error=Reply(553, "5.1.8 bad sender"), stage=Stage.MAIL), False),
])
def test_only_refused_credentials_pause_delivery(result: AttemptResult, paused: bool) -> None:
    assert credentials_rejected(result) is paused


@pytest.mark.plan(46)
@pytest.mark.parametrize("attempts, low, high", [
    (1, 60, 72),      # retry_min, jitter only upwards since clamped at retry_min
    (2, 96, 144),     # 120 +-20%
    (3, 192, 288),    # 240 +-20%
    (7, 2880, 3600),  # 3840 capped at 3600 before jitter, then -20% at most
    (40, 2880, 3600),
])
def test_backoff_doubles_with_jitter_within_bounds(attempts: int, low: float, high: float) -> None:
    """Backoff doubles from retry_min, is jittered +-20%, and stays within the bounds."""
    assert low <= backoff(attempts, CONFIG, 0.0) <= high
    assert low <= backoff(attempts, CONFIG, 0.999) <= high


@pytest.mark.plan(46)
@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0, max_value=0.9999))
def test_backoff_never_leaves_retry_min_to_retry_max(attempts: int, rand: float) -> None:
    """For any attempt count and random draw, retry_min <= backoff <= retry_max."""
    assert CONFIG.retry_min <= backoff(attempts, CONFIG, rand) <= CONFIG.retry_max


@pytest.mark.plan(71)
def test_expiry_by_age_and_by_attempts() -> None:
    """max_age since arrival, or max_attempts when set, expire an entry."""
    assert not is_expired(entry("a@x.com"), T0 + 5 * 86400 - 1, CONFIG)
    assert is_expired(entry("a@x.com"), T0 + 5 * 86400, CONFIG)
    capped = DeliveryConfig(max_attempts=3)
    assert not is_expired(entry("a@x.com", attempts=2), T0, capped)
    assert is_expired(entry("a@x.com", attempts=3), T0, capped)


def test_all_recipients_accepted_is_delivered() -> None:
    """DATA 250 for every recipient: delivered, one attempt recorded with its duration."""
    ok = Reply(250, "2.0.0 Ok")
    result = AttemptResult(relay="up:587", recipients={"a@x.com": ok, "b@x.com": ok})
    settled = settle(entry("a@x.com", "b@x.com"), result, T0, T0 + 0.5, CONFIG, 0.5)
    assert settled.disposition is Disposition.DELIVERED
    assert [r.status for r in settled.entry.recipients] == [Status.SENT, Status.SENT]
    assert settled.entry.attempts[-1].duration == 0.5


def test_partial_acceptance_defers_only_the_pending_recipient() -> None:
    """One 250 and one 451 at RCPT: the entry is deferred with one recipient pending."""
    result = AttemptResult(relay="up:587", recipients={
        "a@x.com": Reply(250, "2.0.0 Ok"), "b@x.com": Reply(451, "4.2.0 busy")})
    settled = settle(entry("a@x.com", "b@x.com"), result, T0, T0, CONFIG, 0.5)
    assert settled.disposition is Disposition.DEFERRED
    assert [r.status for r in settled.entry.recipients] == [Status.SENT, Status.PENDING]
    assert settled.entry.next_attempt == T0 + 60
    assert settled.entry.last_error == "451 4.2.0 busy"
    assert settled.entry.attempts[-1].reply == "1 of 2 recipients sent; 451 4.2.0 busy"


def test_recipient_rejected_and_other_sent_is_failed_for_inspection() -> None:
    """Nothing pending but a recipient failed: the entry goes to failed/."""
    result = AttemptResult(relay="up:587", recipients={
        "a@x.com": Reply(550, "5.1.1 unknown"), "b@x.com": Reply(250, "2.0.0 Ok")})
    settled = settle(entry("a@x.com", "b@x.com"), result, T0, T0, CONFIG, 0.5)
    assert settled.disposition is Disposition.FAILED
    assert [r.status for r in settled.entry.recipients] == [Status.FAILED, Status.SENT]


def test_permanent_data_reply_fails_every_pending_recipient() -> None:
    """5xx after DATA fails the whole message, keeping the upstream's reply."""
    result = AttemptResult(relay="up:587", error=Reply(554, "5.6.0 rejected"), stage=Stage.DATA)
    settled = settle(entry("a@x.com", "b@x.com"), result, T0, T0, CONFIG, 0.5)
    assert settled.disposition is Disposition.FAILED
    assert {r.reply for r in settled.entry.recipients} == {"554 5.6.0 rejected"}


def test_already_sent_recipient_is_never_touched_again() -> None:
    """A recipient sent in an earlier attempt keeps its status whatever happens now."""
    from dataclasses import replace
    before = entry("a@x.com", "b@x.com")
    before = replace(before, recipients=(Recipient("a@x.com", Status.SENT, "250 ok"),
                                         Recipient("b@x.com")))
    result = AttemptResult(relay="up:587", error=Reply(554, "5.6.0 rejected"), stage=Stage.DATA)
    settled = settle(before, result, T0, T0, CONFIG, 0.5)
    assert settled.entry.recipients[0] == Recipient("a@x.com", Status.SENT, "250 ok")


def test_expired_entry_fails_with_the_last_reply() -> None:
    """A temporary failure past max_age fails the entry, naming the last reply."""
    result = AttemptResult(relay="up:587", error=Reply(None, "connection failed: refused"))
    settled = settle(entry("a@x.com"), result, T0 + 6 * 86400, T0 + 6 * 86400, CONFIG, 0.5)
    assert settled.disposition is Disposition.FAILED
    assert settled.entry.last_error == "expired after 1 attempts: connection failed: refused"
    assert settled.entry.recipients[0].status is Status.FAILED


def test_waiting_for_an_upstream_is_not_an_attempt() -> None:
    """Without an upstream the entry records why, but no attempt and no retry time."""
    waiting = await_upstream(entry("a@x.com"))
    assert waiting.last_error == "no upstream configured"
    assert waiting.attempts == () and waiting.next_attempt is None

"""Pure delivery decisions: classify an upstream outcome, back off, expire, settle an entry.

No I/O, no clock, no randomness of its own: `now` and a random number in [0, 1) are
arguments, so every rule here is unit-tested with plain values. The values it decides
with are relay.outcome's. The one table (docs/ARCHITECTURE.md)
lives in `classify`.
"""

from __future__ import annotations

from dataclasses import replace

from .config import DeliveryConfig
from .entry import Attempt, Entry, Recipient, Status
from .outcome import AttemptResult, Disposition, Reply, Settlement, Stage, Verdict

NO_UPSTREAM = "no upstream configured"
EXPIRED = "expired after "  # how an expired recipient's reply begins (is_expiry reads it)
JITTER = 0.2  # +-20%: spreads retries of a backlog so they do not hit the upstream in step


def classify(reply: Reply, stage: Stage) -> Verdict:
    """2xx sent; 5xx to MAIL, RCPT or DATA permanent; everything else temporary.

    A 5xx at the greeting, EHLO, STARTTLS or AUTH says nothing about the message: it is our
    side's trouble (wrong port, credentials, TLS), so it is retried (Postfix's
    smtp_sasl_auth_soft_bounce); as is any error without an SMTP reply, and a recipient
    refused only for the server's per-transaction limit.
    """
    if reply.code is None:
        return Verdict.TEMPORARY
    if 200 <= reply.code < 300:
        return Verdict.SENT
    if 500 <= reply.code < 600 and stage in (Stage.MAIL, Stage.RCPT, Stage.DATA):
        if stage is Stage.RCPT and is_recipient_limit(reply):
            return Verdict.TEMPORARY
        return Verdict.PERMANENT
    return Verdict.TEMPORARY


def is_recipient_limit(reply: Reply) -> bool:
    """A RCPT refused because the transaction has enough recipients, not because of the
    address: 452 (RFC 5321 4.5.3.1.10), or the 552 older servers send, which that section
    says to treat as temporary. Such recipients go in the next transaction."""
    if reply.code == 452:
        return True
    return reply.code == 552 and (reply.text.startswith("5.5.3")
                                  or "too many recipients" in reply.text.lower())


def credentials_rejected(result: AttemptResult) -> bool:
    """The upstream refused our AUTH for good (535 and the like). Every message would meet
    the same refusal, so delivery pauses instead of logging in once per message."""
    error = result.error
    return (result.stage is Stage.AUTH and error is not None and error.code is not None
            and 500 <= error.code < 600)


def backoff(attempts: int, config: DeliveryConfig, rand: float) -> float:
    """Seconds until the next attempt after `attempts` failed ones: doubling from retry_min,
    capped at retry_max, with +-20% jitter, and never outside [retry_min, retry_max]."""
    exponent = min(max(attempts - 1, 0), 64)  # 2**64 * any retry_min is past any cap
    base = min(config.retry_max, config.retry_min * 2.0**exponent)
    jittered = base * (1.0 + JITTER * (2.0 * rand - 1.0))
    return min(config.retry_max, max(config.retry_min, jittered))


def is_expired(entry: Entry, now: float, config: DeliveryConfig) -> bool:
    """Too old (max_age since arrival or requeue) or out of attempts (max_attempts, when set)."""
    if now - entry.age_from >= config.max_age:
        return True
    return config.max_attempts is not None and len(entry.attempts) >= config.max_attempts


def settle(entry: Entry, result: AttemptResult, started: float, now: float,
           config: DeliveryConfig, rand: float) -> Settlement:
    """Apply one attempt's result to the entry's recipients and decide what happens next."""
    recipients = tuple(_settle_recipient(r, result) for r in entry.recipients)
    attempt = Attempt(at=started, relay=result.relay, reply=result.summary,
                      duration=round(max(now - started, 0.0), 3))
    pending = [r for r in recipients if r.status is Status.PENDING]
    failed = [r for r in recipients if r.status is Status.FAILED]
    last_error = _last_error(recipients, result)
    updated = replace(entry, recipients=recipients, attempts=entry.attempts + (attempt,),
                      last_error=last_error, next_attempt=None)
    if not pending:
        return Settlement(updated, Disposition.FAILED if failed else Disposition.DELIVERED)
    if is_expired(updated, now, config):
        why = f"{EXPIRED}{len(updated.attempts)} attempts: "
        recipients = tuple(
            replace(r, status=Status.FAILED, reply=why + (r.reply or result.summary))
            if r.status is Status.PENDING else r
            for r in recipients
        )
        expired = replace(updated, recipients=recipients, last_error=why + (last_error or ""))
        return Settlement(expired, Disposition.FAILED)
    next_attempt = now + backoff(len(updated.attempts), config, rand)
    return Settlement(replace(updated, next_attempt=next_attempt), Disposition.DEFERRED)


def is_expiry(reply: str | None) -> bool:
    """Whether a failed recipient's reply says it expired rather than was refused."""
    return reply is not None and reply.startswith(EXPIRED)


def await_upstream(entry: Entry) -> Entry:
    """The entry as kept while no upstream is configured: not an attempt, no retry time."""
    return replace(entry, last_error=NO_UPSTREAM, next_attempt=None)


def await_turn(entry: Entry, until: float, why: str) -> Entry:
    """The entry kept until its upstream's rate lets it go: not an attempt."""
    return replace(entry, last_error=why, next_attempt=until)


def after_rate_limit(entry: Entry, result: AttemptResult, reply: Reply,
                     until: float) -> Entry:
    """The entry after a provider said we send too fast: recipients it took are sent, the
    others stay pending, and no attempt is counted (the message was not at fault)."""
    recipients = tuple(
        replace(r, status=Status.SENT, reply=str(result.recipients[r.address]))
        if r.status is Status.PENDING and _is_sent(result.recipients.get(r.address)) else r
        for r in entry.recipients)
    return replace(entry, recipients=recipients, last_error=str(reply), next_attempt=until)


def _is_sent(reply: Reply | None) -> bool:
    return reply is not None and reply.code is not None and 200 <= reply.code < 300


def _settle_recipient(recipient: Recipient, result: AttemptResult) -> Recipient:
    if recipient.status is not Status.PENDING:
        return recipient
    if recipient.address in result.recipients:
        reply, stage = result.recipients[recipient.address], Stage.RCPT
    elif result.error is not None:
        reply, stage = result.error, result.stage
    else:
        return recipient
    verdict = classify(reply, stage)
    status = {Verdict.SENT: Status.SENT, Verdict.PERMANENT: Status.FAILED,
              Verdict.TEMPORARY: Status.PENDING}[verdict]
    return replace(recipient, status=status, reply=str(reply))


def _last_error(recipients: tuple[Recipient, ...], result: AttemptResult) -> str | None:
    if result.error is not None:
        return str(result.error)
    troubled = [r.reply for r in recipients if r.status is not Status.SENT and r.reply]
    return troubled[-1] if troubled else None

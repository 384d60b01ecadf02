"""The outcome vocabulary of delivery: what an upstream said, where, and what follows.

Values only, no decisions: relay.policy decides with them (classify, settle), relay.routing
and relay.attempt return them, relay.errors carries a Stage and a Reply. In the order a
delivery meets them:

    Reply, Stage      one SMTP reply (or an error without one) and where it happened
    AttemptResult     what one upstream session reported for one entry
    Verdict           what one reply means for its recipient (policy.classify)
    Reaction          what becomes of the message after an attempt (routing.react)
    Tried, Waiting,   what an attempt over the message's route came to (relay.attempt)
    Limited
    Disposition,      what happens to the entry once the attempt is settled (policy.settle)
    Settlement
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from .entry import Entry


class Stage(enum.Enum):
    """Where in the SMTP dialogue an outcome happened: the one vocabulary of delivery
    (policy.classify), of errors (errors.SessionError.stage) and of `relay check`'s steps
    (the values). A 5xx is permanent only for MAIL, RCPT and DATA."""

    CONNECT = "connect"  # TCP, implicit TLS and the greeting
    STARTTLS = "starttls"
    TLS = "tls"  # the check that TLS is in effect
    AUTH = "auth"
    EHLO = "ehlo"
    RSET = "rset"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command and the reply to the final dot
    QUIT = "quit"
    SESSION = "session"  # the session as a whole, no command in particular


# Where a failure is the upstream's, not the message's: it could not be reached or set up.
SET_UP = frozenset({Stage.CONNECT, Stage.STARTTLS, Stage.TLS, Stage.EHLO, Stage.SESSION})


@dataclass(frozen=True)
class Reply:
    """An SMTP reply, or an error that produced none (code None: refused, timeout, TLS)."""

    code: int | None
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code is not None else self.text


@dataclass(frozen=True)
class AttemptResult:
    """What one upstream session reported for one entry.

    `recipients` maps each address that got an individual answer to it: the RCPT refusal,
    or the final DATA reply for an accepted recipient. Addresses without an answer take
    `error`, the reply that ended the transaction early (at `stage`).
    """

    relay: str
    recipients: Mapping[str, Reply] = field(default_factory=dict)
    error: Reply | None = None
    stage: Stage = Stage.SESSION

    @property
    def summary(self) -> str:
        """One line for the attempt history: the trouble first, if there was any."""
        if self.error is not None:
            return str(self.error)
        replies = list(self.recipients.values())
        if not replies:
            return "no recipients tried"
        sent = sum(r.code is not None and 200 <= r.code < 300 for r in replies)
        trouble = [r for r in replies if r.code is None or not 200 <= r.code < 300]
        if not trouble:
            return str(replies[-1])
        if not sent:
            return str(trouble[0])
        return f"{sent} of {len(replies)} recipients sent; {trouble[0]}"


class Verdict(enum.Enum):
    """What one reply means for the recipient it answers."""

    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class Reaction(enum.Enum):
    """What the delivery does with a message after an attempt."""

    SETTLE = "settle"  # policy.settle, as for any attempt
    FAILOVER = "failover"  # the upstream failed: the next of the route takes it at once
    REQUEUE = "requeue"  # rate limited: back to the queue, no attempt counted


@dataclass(frozen=True)
class Tried:
    """An attempt was made: `entry` (with any failed-over attempts before it in its
    history) and the last upstream's `result`, to be settled."""

    entry: Entry
    result: AttemptResult
    started: float
    upstream: str


@dataclass(frozen=True)
class Waiting:
    """No attempt was made: the entry comes back at `until`. With `record`, the reason is
    kept with it (shown by `relay queue`); without, it just returns to the queue (every
    upstream is down, which `relay queue` shows once for all)."""

    entry: Entry
    until: float
    why: str
    record: bool


@dataclass(frozen=True)
class Limited:
    """The provider said we send too fast: the entry goes back without an attempt counted."""

    entry: Entry
    result: AttemptResult
    reply: Reply
    until: float
    upstream: str


AttemptOutcome = Tried | Waiting | Limited


class Disposition(enum.Enum):
    """What happens to the entry after an attempt."""

    DELIVERED = "delivered"  # every recipient sent: remove from the spool
    DEFERRED = "deferred"  # some recipient still pending: try again at next_attempt
    FAILED = "failed"  # nothing pending and something failed, or expired


@dataclass(frozen=True)
class Settlement:
    """The entry with an attempt applied, and what happens to it next."""

    entry: Entry
    disposition: Disposition

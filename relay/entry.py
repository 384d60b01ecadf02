"""The value types of a queue entry, shared by the spool, policy, delivery and the CLI.

Plain frozen dataclasses with no I/O: the spool turns them into bytes and back, policy
computes new ones from old ones, the CLI formats them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Protocol


class Queue(enum.Enum):
    """Spool directories an entry can live in (Postfix's queue names)."""

    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    FAILED = "failed"
    SCHEDULED = "scheduled"

    @property
    def state(self) -> str:
        """The state an operator sees: queued, deferred, held or failed (docs/CONTRACT.md),
        and scheduled."""
        return _STATE_OF_QUEUE[self]


_STATE_OF_QUEUE = {
    Queue.INCOMING: "queued",
    Queue.ACTIVE: "active",
    Queue.DEFERRED: "deferred",
    Queue.HOLD: "held",
    Queue.FAILED: "failed",
    Queue.SCHEDULED: "scheduled",
}


class Status(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class Recipient:
    address: str
    status: Status = Status.PENDING
    reply: str | None = None  # the upstream's last word about this recipient


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: when, to which relay, what came back, and how long it took."""

    at: float
    relay: str
    reply: str
    duration: float


class Written(Protocol):
    """Content already written to the entry's file in tmp/ (relay.spool.Draft)."""

    size: int

    def finish(self) -> int: ...

    def discard(self) -> None: ...


@dataclass(frozen=True)
class NewEntry:
    """A message received and not yet stored: what the spool needs to publish it, the
    content either in memory (`parts`) or already written to its file (`draft`)."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    parts: tuple[bytes, ...]  # the content in pieces, the headers we add first
    arrived: float
    smtputf8: bool
    draft: Written | None = None
    send_at: float | None = None  # not before then: published into scheduled/
    message_id: str | None = None  # the Message-ID header's value, for the history
    original_sender: str | None = None  # as received, when address rules rewrote it
    original_recipients: tuple[str, ...] | None = None  # likewise

    @property
    def size(self) -> int:
        if self.draft is not None:
            return self.draft.size
        return sum(len(part) for part in self.parts)


@dataclass(frozen=True)
class Entry:
    """Everything known about one queued message except its content."""

    id: str
    queue: Queue
    sender: str
    recipients: tuple[Recipient, ...]
    arrived: float
    size: int
    smtputf8: bool = False
    attempts: tuple[Attempt, ...] = ()
    next_attempt: float | None = None
    last_error: str | None = None
    requeued: float | None = None  # when an operator requeued it: the age for expiry restarts
    notice: str | None = None  # the queue ID of its bounce notice, once one was decided on
    send_at: float | None = None  # when it was (or is) to be sent, if it was scheduled
    message_id: str | None = None
    # The envelope as received, when the address rules rewrote it (relay.addresses).
    original_sender: str | None = None
    original_recipients: tuple[str, ...] | None = None

    @property
    def age_from(self) -> float:
        """Where max_age counts from: arrival, or the later send time or requeue."""
        return max(self.arrived, self.send_at or 0.0, self.requeued or 0.0)

    @property
    def state(self) -> str:
        return self.queue.state

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.status is Status.PENDING)

    def with_queue(self, queue: Queue) -> Entry:
        return replace(self, queue=queue)

"""Operator actions on queue entries: hold, release, delete, requeue, flush, reschedule.

They work on the spool directly, whether or not a daemon runs, and each is one rename or
unlink, so an action and a delivery can never both win: whoever moves the file first owns
the outcome. An entry in active/ belongs to a delivery attempt; the action waits up to
BUSY_WAIT seconds for the attempt to end and then reports the entry busy. An action that
does not apply to the entry where it is (release of a deferred one) is reported as
WrongState. A running daemon notices entries put into incoming/ (flush, release,
requeue) and new times in scheduled/ (reschedule) within a second.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from .entry import Entry, Queue
from .errors import EntryBusy, EntryNotFound, RelayError, WrongState
from .schedule import rfc3339
from .spool import Spool, is_valid_id

BUSY_WAIT = 5.0
BUSY_POLL = 0.05  # seconds between looks at a busy entry: an attempt takes milliseconds


class Action(enum.Enum):
    HOLD = "hold"
    RELEASE = "release"
    DELETE = "delete"
    REQUEUE = "requeue"
    FLUSH = "flush"
    RESCHEDULE = "reschedule"

    @property
    def sources(self) -> tuple[Queue, ...]:
        """The queues an entry must be in for this action to apply (what ALL selects)."""
        return _SOURCES[self]

    @property
    def past(self) -> str:
        """What an entry it was applied to has become: held, released, ..."""
        return _DONE[self]


_SOURCES = {
    Action.HOLD: (Queue.INCOMING, Queue.DEFERRED, Queue.SCHEDULED),
    Action.RELEASE: (Queue.HOLD, Queue.SCHEDULED),
    Action.DELETE: (Queue.INCOMING, Queue.DEFERRED, Queue.SCHEDULED, Queue.HOLD, Queue.FAILED),
    Action.REQUEUE: (Queue.FAILED,),
    Action.FLUSH: (Queue.DEFERRED,),
    Action.RESCHEDULE: (Queue.SCHEDULED, Queue.INCOMING, Queue.DEFERRED, Queue.HOLD),
}
_DONE = {Action.HOLD: "held", Action.RELEASE: "released", Action.DELETE: "deleted",
         Action.REQUEUE: "requeued", Action.FLUSH: "flushed", Action.RESCHEDULE: "rescheduled"}


@dataclass(frozen=True)
class ActionResult:
    entry_id: str
    message: str
    error: RelayError | None = None


def select_all(spool: Spool, action: Action) -> list[str]:
    """Every entry the action applies to (the operator wrote the literal ALL)."""
    return sorted(entry_id for queue in action.sources for entry_id in spool.queue_ids(queue))


def apply(spool: Spool, action: Action, entry_id: str, *, wait: float = BUSY_WAIT,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep, send_at: float = 0.0,
          deleted: Callable[[Entry], None] = lambda entry: None) -> ActionResult:
    """Apply the action to one entry, waiting a little for a delivery that owns it.
    `send_at` is RESCHEDULE's new time; `deleted` hears of each entry DELETE removed,
    as it was (for the delivery history)."""
    if not is_valid_id(entry_id):
        # Checked before any path is built: an ID never escapes the spool.
        return ActionResult(entry_id, "not a queue ID", EntryNotFound(entry_id))
    deadline = clock() + wait
    while True:
        try:
            return _apply_once(spool, action, entry_id, send_at, deleted)
        except EntryBusy as busy:
            if clock() >= deadline:
                return ActionResult(entry_id, "being delivered right now; try again", busy)
            sleep(BUSY_POLL)
        except EntryNotFound as missing:
            return ActionResult(entry_id, "no such message in the queue", missing)


def _apply_once(spool: Spool, action: Action, entry_id: str, send_at: float,
                deleted: Callable[[Entry], None]) -> ActionResult:
    if action is Action.DELETE:
        entry = spool.delete(entry_id)
        if entry is not None:
            deleted(entry)
        where = entry.state if entry is not None else "corrupt"
        return ActionResult(entry_id, f"deleted (was {where})")
    if action is Action.REQUEUE:
        moved = spool.requeue(entry_id, time.time())
    elif action is Action.RESCHEDULE:
        moved = spool.reschedule(entry_id, action.sources, send_at, time.time())
    elif action is Action.RELEASE:
        # A held entry goes as before; a scheduled one is sent now, and its send time,
        # from which max_age counts, becomes now.
        moved = spool.move(entry_id, (Queue.HOLD,), Queue.INCOMING) or \
            spool.reschedule(entry_id, (Queue.SCHEDULED,), 0.0, time.time())
    else:
        target = Queue.HOLD if action is Action.HOLD else Queue.INCOMING
        moved = spool.move(entry_id, action.sources, target)
    if moved is None:
        state = spool.find(entry_id).state
        return ActionResult(entry_id, f"not {action.past}: message is {state}",
                       WrongState(entry_id, state))
    if action is Action.RESCHEDULE:
        due = f"for {rfc3339(send_at)}" if moved.queue is Queue.SCHEDULED else "due now"
        return ActionResult(entry_id, f"rescheduled {due}")
    if action in (Action.FLUSH, Action.RELEASE, Action.REQUEUE):
        spool.ask_retry()  # the operator means now: upstreams marked down are probed
    return ActionResult(entry_id, action.past)

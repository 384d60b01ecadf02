"""Operator actions on queue entries: hold, release, delete, requeue, flush.

They work on the spool directly, whether or not a daemon runs, and each is one rename or
unlink, so an action and a delivery can never both win: whoever moves the file first owns
the outcome. An entry in active/ belongs to a delivery attempt; the action waits up to
BUSY_WAIT seconds for the attempt to end and then reports the entry busy. An action that
does not apply to the entry where it is (release of a deferred one) is reported as
WrongState. A running daemon notices entries put into incoming/ (flush, release,
requeue) within a second.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from .entry import Queue
from .errors import EntryBusy, EntryNotFound, RelayError, WrongState
from .spool import Spool, is_valid_id

BUSY_WAIT = 5.0


class Action(enum.Enum):
    HOLD = "hold"
    RELEASE = "release"
    DELETE = "delete"
    REQUEUE = "requeue"
    FLUSH = "flush"

    @property
    def sources(self) -> tuple[Queue, ...]:
        """The queues an entry must be in for this action to apply (what ALL selects)."""
        return _SOURCES[self]

    @property
    def past(self) -> str:
        """What an entry it was applied to has become: held, released, ..."""
        return _DONE[self]


_SOURCES = {
    Action.HOLD: (Queue.INCOMING, Queue.DEFERRED),
    Action.RELEASE: (Queue.HOLD,),
    Action.DELETE: (Queue.INCOMING, Queue.DEFERRED, Queue.HOLD, Queue.FAILED),
    Action.REQUEUE: (Queue.FAILED,),
    Action.FLUSH: (Queue.DEFERRED,),
}
_DONE = {Action.HOLD: "held", Action.RELEASE: "released", Action.DELETE: "deleted",
         Action.REQUEUE: "requeued", Action.FLUSH: "flushed"}


@dataclass(frozen=True)
class Outcome:
    entry_id: str
    message: str
    error: RelayError | None = None


def select_all(spool: Spool, action: Action) -> list[str]:
    """Every entry the action applies to (the operator wrote the literal ALL)."""
    return sorted(entry_id for queue in action.sources for entry_id in spool.queue_ids(queue))


def apply(spool: Spool, action: Action, entry_id: str, *, wait: float = BUSY_WAIT,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Apply the action to one entry, waiting a little for a delivery that owns it."""
    if not is_valid_id(entry_id):
        # Checked before any path is built: an ID never escapes the spool.
        return Outcome(entry_id, "not a queue ID", EntryNotFound(entry_id))
    deadline = clock() + wait
    while True:
        try:
            return _apply_once(spool, action, entry_id)
        except EntryBusy as busy:
            if clock() >= deadline:
                return Outcome(entry_id, "being delivered right now; try again", busy)
            sleep(0.05)
        except EntryNotFound as missing:
            return Outcome(entry_id, "no such message in the queue", missing)


def _apply_once(spool: Spool, action: Action, entry_id: str) -> Outcome:
    if action is Action.DELETE:
        queue = spool.delete(entry_id)
        where = queue.state if queue is not None else "corrupt"
        return Outcome(entry_id, f"deleted (was {where})")
    if action is Action.REQUEUE:
        moved = spool.requeue(entry_id, time.time())
    else:
        target = Queue.HOLD if action is Action.HOLD else Queue.INCOMING
        moved = spool.move(entry_id, action.sources, target)
    if moved is None:
        state = spool.find(entry_id).state
        return Outcome(entry_id, f"not {action.past}: message is {state}",
                       WrongState(entry_id, state))
    return Outcome(entry_id, action.past)

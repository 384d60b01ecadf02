"""Every public spool method says whether the event loop may call it (relay.spool.marks)."""

from __future__ import annotations

import inspect

import pytest

from relay.spool import Draft, Spool
from relay.spool.marks import BLOCKING, LOOP_SAFE, mark_of

# What the event loop calls today: delivery's claims, reads of small entries and returns
# to the queue (relay.delivery), the listener's room check and drafts (relay.listener).
ON_THE_LOOP = (
    "claim", "claim_new", "waiting_until", "content", "unclaim", "return_to_queue",
    "active_ids", "incoming_version", "publish_upstreams", "check_room", "draft",
)
# What must never run there: each fsyncs or grows with the queue.
OFF_THE_LOOP = (
    "store", "store_many", "defer", "fail", "set_aside", "remove", "empty_spares",
    "recover", "due_times", "entries", "queue_ids", "requeue", "reschedule", "delete",
)


def public_methods(cls: type) -> list[str]:
    return [name for name, value in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")]


@pytest.mark.parametrize("cls", [Spool, Draft])
def test_every_public_method_is_marked_loop_safe_or_blocking(cls: type) -> None:
    """No public method of the spool or a draft goes without one of the two marks."""
    unmarked = [name for name in public_methods(cls)
                if mark_of(getattr(cls, name)) not in (LOOP_SAFE, BLOCKING)]
    assert public_methods(cls) and unmarked == []


def test_what_the_event_loop_calls_is_marked_loop_safe() -> None:
    """The calls delivery and the listener make on the loop are the loop-safe ones."""
    assert {name: mark_of(getattr(Spool, name)) for name in ON_THE_LOOP} == \
        dict.fromkeys(ON_THE_LOOP, LOOP_SAFE)
    assert mark_of(Draft.write) == mark_of(Draft.discard) == LOOP_SAFE


def test_what_fsyncs_or_grows_with_the_queue_is_marked_blocking() -> None:
    """Stores, state records, removals and whole-queue work are marked blocking."""
    assert {name: mark_of(getattr(Spool, name)) for name in OFF_THE_LOOP} == \
        dict.fromkeys(OFF_THE_LOOP, BLOCKING)
    assert mark_of(Draft.finish) == BLOCKING

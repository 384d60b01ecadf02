"""Whether a spool call may run on the event loop: every public method of the spool
carries one of these two marks, and tests/test_spool_marks.py checks that it does.

`@loop_safe`: no fsync, and a bounded handful of system calls (renames, stats, opens,
reads and writes of one small file, to the page cache). That takes microseconds, less
than a hop to a thread and back, which also contends for the GIL with the listener.

`@blocking`: an fsync, or work that grows with the queue or the spool's directories. It
runs in a thread: the spool writer's (relay.writer), a worker (asyncio.to_thread), or a
command-line process that has no loop.

A mark changes nothing at run time: the method is returned as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

LOOP_SAFE = "loop-safe"
BLOCKING = "blocking"
MARK = "spool_call"  # the attribute each mark sets on its method

F = TypeVar("F", bound=Callable[..., object])


def loop_safe(method: F) -> F:
    """Mark `method` as one the event loop may call."""
    setattr(method, MARK, LOOP_SAFE)
    return method


def blocking(method: F) -> F:
    """Mark `method` as one to call from a thread."""
    setattr(method, MARK, BLOCKING)
    return method


def mark_of(method: object) -> str | None:
    """LOOP_SAFE, BLOCKING, or None for a method without a mark."""
    mark = getattr(method, MARK, None)
    return mark if isinstance(mark, str) else None

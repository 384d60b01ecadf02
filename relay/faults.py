"""Named fault points for fault-injection tests (docs/RELIABILITY-PLAN.md).

With RELAY_CRASH_AT=<name> in the environment the relay SIGKILLs itself on reaching that
point, as a power cut or the OOM killer would: no cleanup, no flush. With
RELAY_RAISE_AT=<name> it raises InjectedFault there instead, as a bug would. Without
either, every call is a no-op. The tests use them to prove that each step of the ingest
and delivery paths is crash-safe, and that our own exceptions never reach a client raw.
"""

from __future__ import annotations

import os
import signal

FAULT_POINTS = (
    "before-spool-write",  # nothing written yet
    "after-fsync-before-rename",  # a complete file in tmp/, not published
    "after-rename-before-250",  # published, the client never hears 250
    "after-upstream-reply-before-state",  # the upstream answered, the spool not updated
    "in-spool-writer",  # the writer thread, outside any one store: the thread dies
    "in-delivery-worker",  # a delivery worker, outside any one entry: the worker dies
)
_CRASH_AT = os.environ.get("RELAY_CRASH_AT")
_RAISE_AT = os.environ.get("RELAY_RAISE_AT")


class InjectedFault(Exception):
    """Deliberately not a RelayError: it stands for a bug, which nothing expects."""


def fault_point(name: str) -> None:
    assert name in FAULT_POINTS, name
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if name == _RAISE_AT:
        raise InjectedFault(f"fault injected at {name}")

"""Named crash points for fault-injection tests (RELIABILITY-PLAN.md, "Fault points").

With RELAY_CRASH_AT=<name> in the environment the relay SIGKILLs itself on reaching that
point, as a power cut or the OOM killer would: no cleanup, no flush. Without it every call
is a no-op. The tests use it to prove that each step of the ingest and delivery paths is
crash-safe.
"""

from __future__ import annotations

import os
import signal

CRASH_POINTS = (
    "before-spool-write",  # nothing written yet
    "after-fsync-before-rename",  # a complete file in tmp/, not published
    "after-rename-before-250",  # published, the client never hears 250
    "after-upstream-reply-before-state",  # the upstream answered, the spool not updated
)
_ARMED = os.environ.get("RELAY_CRASH_AT")


def crash_point(name: str) -> None:
    assert name in CRASH_POINTS, name
    if _ARMED == name:
        os.kill(os.getpid(), signal.SIGKILL)

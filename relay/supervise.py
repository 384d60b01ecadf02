"""Supervision of the daemon's long-lived tasks: delivery workers, the incoming watcher,
the sweep of active/, housekeeping.

A task that raises is logged with its traceback and run again after a short pause, so
one bad moment does not stop delivery for good; one that keeps failing (more than
RESTARTS times within WINDOW seconds) is given up on, and `fatal` hears of it: the daemon
then exits 70 and systemd (Restart=on-failure) starts a fresh process. Nothing hangs,
and nothing dies in silence ("Task exception was never retrieved").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .errors import TaskFailed
from .log import log_failure

RESTARTS = 5
WINDOW = 60.0
PAUSE = 0.5  # before a restart: a fault that repeats at once must not spin the loop


async def supervised(name: str, run: Callable[[], Awaitable[None]],
                     fatal: Callable[[TaskFailed], None], *,
                     clock: Callable[[], float] = time.monotonic, restarts: int = RESTARTS,
                     window: float = WINDOW, pause: float = PAUSE) -> None:
    """Run `run()` until it returns or is cancelled, restarting it when it raises."""
    crashes: list[float] = []
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any crash is restarted, within limits
            now = clock()
            crashes = [t for t in crashes if now - t < window] + [now]
            if len(crashes) > restarts:
                failure = TaskFailed(name, exc)
                failure.__cause__ = exc
                fatal(failure)
                return
            log_failure(logging.ERROR, None, exc, event="task", task=name, status="died",
                        reason=f"{type(exc).__name__}: {exc}", action="restarted")
            await asyncio.sleep(pause)

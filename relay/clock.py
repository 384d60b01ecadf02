"""The relay's clock: wall-clock time that does not jump while the relay runs.

Arrival, retry and expiry times are wall-clock (they are shown to operators and kept in
the spool), but a step of the system clock must not expire every queued message at once
(30 days forward) or push every retry a day away (one day back). So the relay reads the
wall clock once at start and advances it by monotonic time; `skew()` says how far the
system clock has moved away since, for a warning. A restart adopts the system clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class SteadyClock:
    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._origin = wall() - monotonic()

    def __call__(self) -> float:
        return self._origin + self._monotonic()

    def skew(self) -> float:
        """Seconds the system clock is ahead of this one (negative: behind)."""
        return self._wall() - self()

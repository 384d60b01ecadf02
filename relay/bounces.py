"""Bounce notices: when a message fails for good, tell its sender (or an operator's
address) with an RFC 3464 notice sent through the relay's own queue.

Off unless `bounces.notify` says whom to tell. Never for a message whose sender is `<>`:
that covers notices themselves, which are sent from `<>`, so a notice that fails in turn
makes no other. At most `bounces.max_per_hour` notices go to one address in an hour;
the rest are counted (relay_bounces_total{outcome="rate_limited"}) and logged.

Never more than once per message: the notice's queue ID is decided before the failure is
recorded and written into the message's state record with it (the same write, so no
extra fsync), and a message whose record names a notice gets no other, even after a
`relay queue requeue` and a second failure. The notice is stored after the failure is
recorded, so a crash between the two (the few milliseconds of one store) loses that
notice and never sends it twice; the failure itself stays in failed/ and in the log.
The other order would send it twice after such a crash, since the message would be tried
and fail again; telling the two cases apart after a crash would need a second record
written after the store, and the notice may be delivered and gone before it is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import replace

from . import dsn
from .config import BouncesConfig
from .entry import Entry, NewEntry
from .errors import SpoolError
from .headers import split_header
from .log import log_event
from .metrics import BounceOutcome, Recorder
from .spool import Spool, new_id
from .writer import SpoolWriter

logger = logging.getLogger("relay.bounces")
WINDOW_SECONDS = 3600.0


class RateLimit:
    """At most `limit` events per key in any `window` seconds. In memory: a restart
    forgets, which at worst lets one more hour's worth through."""

    def __init__(self, limit: int, window: float = WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, collections.deque[float]] = {}

    def allow(self, key: str, now: float) -> bool:
        """Count an event for `key` at `now` and say whether it is within the limit."""
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        if len(self._events) > 10_000:  # many senders: forget the quiet ones
            self._events = {k: v for k, v in self._events.items()
                            if v and v[-1] > now - self.window}
        return True


def notice_recipient(config: BouncesConfig, entry: Entry) -> str | None:
    """Whom a failure of `entry` is told to, or None: notices off, or a null sender."""
    if config.notify == "none" or entry.sender == "":
        return None
    return entry.sender if config.notify == "sender" else config.notify


class Bounces:
    """Records failures (Spool.fail) and queues their notices. `schedule` hands a stored
    notice to delivery, as the listener hands a new message."""

    def __init__(self, config: BouncesConfig, spool: Spool, writer: SpoolWriter,
                 schedule: Callable[[Entry, tuple[bytes, ...]], None], hostname: str,
                 clock: Callable[[], float], metrics: Recorder) -> None:
        self.config = config
        self.spool = spool
        self.writer = writer
        self.schedule = schedule
        self.hostname = hostname
        self.clock = clock
        self.metrics = metrics
        self.limit = RateLimit(config.max_per_hour)

    def reconfigure(self, config: BouncesConfig) -> None:
        self.config = config
        self.limit.limit = config.max_per_hour

    async def fail(self, entry: Entry) -> Entry:
        """Move an entry whose recipients are settled, some failed, into failed/; then
        queue its notice if one is due. Returns the entry as recorded."""
        to = self._due(entry)
        if to is not None:
            entry = replace(entry, notice=new_id(self.clock()))
        failed = await asyncio.to_thread(self.spool.fail, entry)
        if to is not None:
            await self._send(failed, to)
        return failed

    def _due(self, entry: Entry) -> str | None:
        """The address to notify, if a notice is due and within the rate limit."""
        if entry.notice is not None or not dsn.failed(entry):
            return None  # one was queued before a requeue; or nothing failed
        to = notice_recipient(self.config, entry)
        if to is None:
            return None
        if not self.limit.allow(to.lower(), self.clock()):
            self.metrics.bounce(BounceOutcome.RATE_LIMITED)
            log_event(logging.WARNING, entry.id, event="bounce", to=to, status="suppressed",
                      reason=f"more than bounces.max_per_hour ({self.limit.limit}) notices "
                             "to this address in the last hour")
            return None
        return to

    async def _send(self, entry: Entry, to: str) -> None:
        assert entry.notice is not None
        now = self.clock()
        try:
            content = await asyncio.to_thread(self.spool.content, entry)
            message = dsn.build(
                entry, b"".join(split_header(content)[0]), notice_id=entry.notice,
                hostname=self.hostname, to_address=to, now=now,
                from_address=self.config.from_address or f"MAILER-DAEMON@{self.hostname}")
            new = NewEntry(entry.notice, "", (to,), (message,), now, not to.isascii())
            stored = await self.writer.store(new)
        except SpoolError as exc:
            self.metrics.bounce(BounceOutcome.FAILED)
            log_event(logging.ERROR, entry.id, event="bounce", to=to, status="lost",
                      reason=f"the notice could not be stored: {exc}")
            return
        except Exception:
            # A bug of ours in a notice must not cost the failure its log line or the
            # worker its next message.
            self.metrics.bounce(BounceOutcome.FAILED)
            logger.exception("%s: the bounce notice could not be built", entry.id)
            return
        self.metrics.bounce(BounceOutcome.QUEUED)
        log_event(logging.INFO, entry.id, event="bounce", to=to, notice=stored.id,
                  status="queued")
        self.schedule(stored, new.parts)

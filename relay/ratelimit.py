"""Rate limits: a token bucket per upstream, and spotting a provider's rate-limit reply.

`rate: 300/h` lets one message go every 12 s. A provider that says it is rate limiting
us (421 or 451 with a 4.7.x code, or "rate" or "too many" in its text; the API's 429)
pauses that upstream for retry_min, and the message goes back to the queue without an
attempt counted. Pure: no I/O, `now` is an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .config import Rate
from .outcome import AttemptResult, Reply

# The bucket holds one token: messages go evenly spaced, never in a burst. A full bucket
# of N tokens would let 2N go within one of the provider's windows (N at its end, N
# more at the start of the next), past an hourly cap it counts over a sliding hour.
BURST = 1.0
# A shorter wait is none: epoch seconds as floats are rounded to about 0.2 us, so a
# worker woken at the computed time could otherwise find a few ulps still to wait.
NEGLIGIBLE = 1e-5
_RATE_WORDS = re.compile(r"\brate|too many")


@dataclass(frozen=True)
class Bucket:
    """An upstream's tokens as of time `at`; below zero when tokens were taken ahead."""

    tokens: float = BURST
    at: float = 0.0
    paused_until: float = 0.0  # the provider said it is rate limiting us

    def wait(self, rate: Rate | None, now: float) -> float:
        """Seconds until a message may go to this upstream; 0.0 means now."""
        start = max(now, self.paused_until)
        wait = start - now
        if rate is not None:
            wait += max(1.0 - self._tokens(rate, start), 0.0) * rate.per / rate.count
        return wait if wait >= NEGLIGIBLE else 0.0

    def take(self, rate: Rate | None, now: float) -> Bucket:
        """The bucket after one message went at `now`. A token taken before it is there
        is owed, and the next wait is one interval longer: a message given a turn ahead
        (now plus `wait`) can take its token at once and keep that turn."""
        if rate is None:
            return self
        return replace(self, tokens=self._tokens(rate, now) - 1.0, at=now)

    def pause(self, until: float) -> Bucket:
        """No message before `until` (the provider's rate limiting, for retry_min)."""
        return replace(self, paused_until=max(self.paused_until, until))

    def _tokens(self, rate: Rate, now: float) -> float:
        refill = max(now - self.at, 0.0) * rate.count / rate.per
        return min(BURST, self.tokens + refill)


def is_rate_limit(reply: Reply) -> bool:
    """A 421 or 451 by which a provider says we send too fast: a 4.7.x enhanced code
    (RFC 3463: security or policy), or the words "rate" or "too many" in its text."""
    if reply.code not in (421, 451):
        return False
    text = reply.text.lower()
    return text.startswith("4.7.") or _RATE_WORDS.search(text) is not None


def rate_limited(result: AttemptResult) -> Reply | None:
    """The reply by which the provider limited this attempt's rate, if one did: the
    reply that ended the transaction, or a recipient's."""
    for reply in (result.error, *result.recipients.values()):
        if reply is not None and is_rate_limit(reply):
            return reply
    return None

"""When a message is to be sent: the ways a client or an operator names a time, read and
checked, with the SMTP reply for what is refused.

Pure: `now` and the limit (`delivery.max_schedule`) are arguments; nothing here reads a
clock or a file. The listener calls `futurerelease_keyword` for its EHLO reply,
`hold_send_at` at MAIL (RFC 4865's HOLDFOR= and HOLDUNTIL=) and `message_send_at` at the
final dot (the X-Relay-Send-At header, for applications whose SMTP library cannot add
MAIL parameters); the command line reads TIME and DURATION arguments with `parse_time`,
`parse_when` and `parse_since`. A send time that has already passed means "send now"
(None), as RFC 4865 asks of a HOLDUNTIL in the past.
"""

from __future__ import annotations

import calendar
import datetime
import email.utils
import math
import re
import time

from .config import parse_duration
from .errors import ScheduleRefused
from .headers import split_header

HEADER = "X-Relay-Send-At"
# RFC 3339 section 5.6 date-time (RFC 4865's erratum 2040); lower-case t and z, and a
# space for the T, as section 5.6 allows.
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?"
                      r"(?:([Zz])|([+-])(\d\d):(\d\d))")
_HOLDFOR = re.compile(r"[0-9]{1,9}")  # RFC 4865: at most nine digits of seconds
_HEADER_FIELD = re.compile(rb"^" + HEADER.encode() + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)


def rfc3339(timestamp: float) -> str:
    """A time as RFC 3339 UTC to the second, e.g. 2026-12-05T09:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(timestamp)))


def futurerelease_keyword(max_schedule: float, now: float) -> str:
    """The EHLO keyword line (without "250-"): RFC 4865's longest hold in seconds and the
    latest release time it allows, e.g. `FUTURERELEASE 2592000 2027-01-03T09:00:00Z`."""
    return f"FUTURERELEASE {int(max_schedule)} {rfc3339(now + int(max_schedule))}"


def hold_send_at(holdfor: str | None, holduntil: str | None, now: float,
                 max_schedule: float) -> float | None:
    """The send time a MAIL command asks for: the text after HOLDFOR= or HOLDUNTIL= (None
    for a parameter not given). None means send now: neither given, HOLDFOR=0, or a
    HOLDUNTIL already past. Raises ScheduleRefused with RFC 4865's 501 5.5.4 for a
    malformed value, both parameters at once, or a time beyond `max_schedule`."""
    if holdfor is not None and holduntil is not None:
        raise ScheduleRefused("501 5.5.4 Error: HOLDFOR and HOLDUNTIL cannot both be given")
    limit = int(max_schedule)
    if holdfor is not None:
        if not _HOLDFOR.fullmatch(holdfor):
            raise ScheduleRefused("501 5.5.4 Error: HOLDFOR takes a number of seconds "
                                  "(at most 9 digits)")
        seconds = int(holdfor)
        if seconds > limit:
            raise ScheduleRefused(f"501 5.5.4 Error: HOLDFOR={seconds} is beyond the limit of "
                                  f"{limit} seconds")
        return now + seconds if seconds > 0 else None
    if holduntil is not None:
        try:
            when = parse_rfc3339(holduntil)
        except ValueError:
            raise ScheduleRefused("501 5.5.4 Error: HOLDUNTIL takes an RFC 3339 date-time "
                                  "such as 2026-12-05T09:00:00Z") from None
        if when > now + limit:
            raise ScheduleRefused(f"501 5.5.4 Error: HOLDUNTIL is beyond the latest release "
                                  f"time, {rfc3339(now + limit)}")
        return when if when > now else None
    return None


def message_send_at(content: bytes, now: float, max_schedule: float,
                    head: list[bytes] | None = None) -> tuple[float | None, bytes]:
    """The send time the X-Relay-Send-At header asks for (None: no header, or a time
    already past) and the content without that header, every other byte as it was; the
    content itself when it has no such header. `head` is the content's header lines
    (headers.split_header), when the caller has them. Raises ScheduleRefused with 554
    5.6.0, naming the header, for a value that is not an RFC 3339 or RFC 5322 date-time,
    a time beyond `max_schedule`, or more than one such header."""
    if head is None:
        head = split_header(content)[0]
    # One search in C over the header section; the lines are walked only after a hit.
    if _HEADER_FIELD.search(content, 0, sum(map(len, head))) is None:
        return None, content
    values, stripped = _take_header(content, head)
    if len(values) > 1:
        raise ScheduleRefused(f"554 5.6.0 Error: more than one {HEADER} header")
    try:
        when = parse_date_time(values[0])
    except ValueError:
        raise ScheduleRefused(f"554 5.6.0 Error: {HEADER} header is not an RFC 3339 or "
                              f"RFC 5322 date-time") from None
    limit = int(max_schedule)
    if when > now + limit:
        raise ScheduleRefused(f"554 5.6.0 Error: {HEADER} is beyond the latest send time, "
                              f"{rfc3339(now + limit)}")
    return (when if when > now else None), stripped


def _take_header(content: bytes, head: list[bytes]) -> tuple[list[str], bytes]:
    """The values of every X-Relay-Send-At field (unfolded) and the content without them."""
    prefix = HEADER.lower().encode()
    values: list[list[bytes]] = []  # each field's lines, joined once at the end
    cut: list[tuple[int, int]] = []  # byte spans of the fields, continuation lines included
    position = 0
    taking = False
    for line in head:
        if line[:1] in (b" ", b"\t") and taking:
            cut[-1] = (cut[-1][0], position + len(line))
            values[-1].append(line)
        else:
            name = line.split(b":", 1)[0].rstrip(b" \t").lower()
            taking = name == prefix
            if taking:
                cut.append((position, position + len(line)))
                values.append([line.split(b":", 1)[1]])
        position += len(line)
    kept = []
    start = 0
    for begin, end in cut:
        kept.append(content[start:begin])
        start = end
    kept.append(content[start:])
    return ([" ".join(b"".join(value).decode("utf-8", "replace").split()) for value in values],
            b"".join(kept))


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 date-time; ValueError if it is not one."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time: {text!r}")
    year, month, day, hour, minute, second = (int(match.group(n)) for n in range(1, 7))
    leap = second == 60  # a leap second: the instant after :59
    datetime.datetime(year, month, day, hour, minute, 59 if leap else second)  # range check
    seconds = calendar.timegm((year, month, day, hour, minute, 59 if leap else second)) \
        + float(match.group(7) or 0) + leap
    if match.group(9):
        offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
        if int(match.group(10)) > 23 or int(match.group(11)) > 59:
            raise ValueError(f"offset out of range: {text!r}")
        seconds -= offset if match.group(9) == "+" else -offset
    return seconds


def parse_date_time(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 or an RFC 5322 date-time (a zone of -0000
    or none is UTC); ValueError if it is neither."""
    try:
        return parse_rfc3339(text)
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise ValueError(f"not an RFC 3339 or RFC 5322 date-time: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def parse_time(text: str) -> float:
    """A TIME argument: ISO 8601 / RFC 3339 (without an offset it is local time, a date
    alone its local midnight) or RFC 5322. ValueError with what is accepted."""
    try:
        return parse_date_time(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"expected a time like 2026-12-05T09:00:00Z or "
                         f"'2026-12-05 09:00' (local time), got {text!r}") from None


def parse_when(text: str, now: float) -> float:
    """A TIME, or a DURATION from `now` ('90', '5m', '2h', '1d')."""
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"expected a duration like 5m or 2h, or a time like "
                         f"2026-12-05T09:00:00Z, got {text!r}") from None


def parse_since(text: str, now: float) -> float:
    """A TIME, or a DURATION before `now` (`--since 1h`)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"expected a duration like 1h or 24h, or a time like "
                         f"2026-12-05T09:00:00Z, got {text!r}") from None


def hold_parameter(send_at: float) -> str:
    """The MAIL parameter that asks the listener to hold a message until `send_at`, whole
    seconds rounded up so that it never goes early."""
    return f"HOLDUNTIL={rfc3339(math.ceil(send_at))}"

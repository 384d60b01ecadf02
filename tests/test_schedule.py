"""Send times as clients and operators name them (relay.schedule): RFC 4865's HOLDFOR and
HOLDUNTIL, the X-Relay-Send-At header, the EHLO keyword, and TIME/DURATION arguments."""

from __future__ import annotations

import calendar

import pytest

from relay.errors import ScheduleRefused
from relay.schedule import (
    futurerelease_keyword,
    hold_parameter,
    hold_send_at,
    message_send_at,
    parse_date_time,
    parse_since,
    parse_time,
    parse_when,
    rfc3339,
)

NOW = calendar.timegm((2026, 12, 4, 12, 0, 0))  # 2026-12-04T12:00:00Z
DAY = 86400.0
LIMIT = 30 * DAY


def refusal(call: object, *args: object) -> str:
    with pytest.raises(ScheduleRefused) as info:
        call(*args)  # type: ignore[operator]
    return info.value.reply


def test_ehlo_keyword_gives_the_interval_and_the_latest_time() -> None:
    """FUTURERELEASE <max seconds> <now + max as RFC 3339 UTC>."""
    assert futurerelease_keyword(LIMIT, NOW) == "FUTURERELEASE 2592000 2027-01-03T12:00:00Z"


def test_holdfor_is_seconds_from_now() -> None:
    """HOLDFOR=3600: an hour after the MAIL command."""
    assert hold_send_at("3600", None, NOW, LIMIT) == NOW + 3600


def test_holdfor_zero_and_no_parameter_mean_send_now() -> None:
    """HOLDFOR=0, or no parameter: send now (None)."""
    assert hold_send_at("0", None, NOW, LIMIT) is None
    assert hold_send_at(None, None, NOW, LIMIT) is None


def test_holdfor_up_to_the_limit_is_taken_and_beyond_it_refused_501_554() -> None:
    """RFC 4865: a hold beyond the advertised interval is 501 5.5.4."""
    assert hold_send_at("2592000", None, NOW, LIMIT) == NOW + LIMIT
    assert refusal(hold_send_at, "2592001", None, NOW, LIMIT).startswith("501 5.5.4 ")


@pytest.mark.parametrize("value", ["", "-5", "1.5", "12a", "1234567890", " 60"])
def test_malformed_holdfor_is_refused_501_554(value: str) -> None:
    """HOLDFOR is 1 to 9 digits, nothing else."""
    assert refusal(hold_send_at, value, None, NOW, LIMIT).startswith("501 5.5.4 ")


@pytest.mark.parametrize("value, expected", [
    ("2026-12-05T09:00:00Z", NOW + 21 * 3600),
    ("2026-12-05t09:00:00z", NOW + 21 * 3600),
    ("2026-12-05T10:00:00+01:00", NOW + 21 * 3600),
    ("2026-12-05T04:00:00-05:00", NOW + 21 * 3600),
    ("2026-12-05T09:00:00.250Z", NOW + 21 * 3600 + 0.25),
])
def test_holduntil_takes_rfc_3339_with_any_offset(value: str, expected: float) -> None:
    """Z, lower case, numeric offsets and fractions of a second all name the same instant."""
    assert hold_send_at(None, value, NOW, LIMIT) == expected


def test_holduntil_in_the_past_means_send_now() -> None:
    """RFC 4865: a release time already past releases the message at once."""
    assert hold_send_at(None, "2026-12-01T00:00:00Z", NOW, LIMIT) is None


def test_holduntil_beyond_the_latest_time_is_refused_501_554() -> None:
    """One second past now + max_schedule is refused, naming the latest time; at it, taken."""
    reply = refusal(hold_send_at, None, "2027-01-03T12:00:01Z", NOW, LIMIT)
    assert reply.startswith("501 5.5.4 ") and "2027-01-03T12:00:00Z" in reply
    assert hold_send_at(None, "2027-01-03T12:00:00Z", NOW, LIMIT) == NOW + LIMIT


@pytest.mark.parametrize("value", ["2026-12-05", "2026-12-05T09:00Z", "2026-13-05T09:00:00Z",
                                   "2026-12-05T09:00:00", "tomorrow", "2026-02-30T09:00:00Z",
                                   "2026-12-05T09:00:00+24:00"])
def test_malformed_holduntil_is_refused_501_554(value: str) -> None:
    """Not an RFC 3339 date-time with seconds and an offset, or out of range: 501 5.5.4."""
    assert refusal(hold_send_at, None, value, NOW, LIMIT).startswith("501 5.5.4 ")


def test_holdfor_and_holduntil_together_are_refused_501_554() -> None:
    """RFC 4865 allows one of the two parameters, not both."""
    assert refusal(hold_send_at, "60", "2026-12-05T09:00:00Z", NOW, LIMIT).startswith(
        "501 5.5.4 ")


def test_header_time_is_taken_and_the_header_removed_byte_for_byte() -> None:
    """The header goes, with its folded line; every other byte stays, a body line that
    looks like the header included."""
    content = (b"From: a@example.com\r\nX-Relay-Send-At:\r\n 2026-12-05T09:00:00Z\r\n"
               b"Subject: s\r\n\r\nX-Relay-Send-At: 2030-01-01T00:00:00Z\r\n\xff body\r\n")
    send_at, stripped = message_send_at(content, NOW, LIMIT)
    assert send_at == NOW + 21 * 3600
    assert stripped == (b"From: a@example.com\r\nSubject: s\r\n\r\n"
                        b"X-Relay-Send-At: 2030-01-01T00:00:00Z\r\n\xff body\r\n")


def test_header_takes_an_rfc_5322_date() -> None:
    """An RFC 5322 date with an offset; the header name in any case."""
    content = b"x-relay-send-at: Sat, 05 Dec 2026 10:00:00 +0100\r\n\r\nbody\r\n"
    assert message_send_at(content, NOW, LIMIT) == (NOW + 21 * 3600, b"\r\nbody\r\n")


def test_content_without_the_header_is_returned_as_it_is() -> None:
    """No header (a body line does not count): the very same bytes object, no copy."""
    content = b"Subject: s\r\n\r\nX-Relay-Send-At: 2026-12-05T09:00:00Z\r\n"
    send_at, stripped = message_send_at(content, NOW, LIMIT)
    assert send_at is None and stripped is content


def test_header_time_already_past_means_send_now_and_the_header_still_goes() -> None:
    """A past time sends now, and the header is removed all the same."""
    content = b"X-Relay-Send-At: 2026-01-01T00:00:00Z\r\nSubject: s\r\n\r\nbody\r\n"
    assert message_send_at(content, NOW, LIMIT) == (None, b"Subject: s\r\n\r\nbody\r\n")


@pytest.mark.parametrize("value", ["soon", "2026-12-05", "32 Dec 2026 09:00:00 +0000"])
def test_unparsable_header_is_refused_554_560_naming_it(value: str) -> None:
    """A value that is no date-time: 554 5.6.0 with the header's name."""
    content = b"X-Relay-Send-At: " + value.encode() + b"\r\n\r\nbody\r\n"
    reply = refusal(message_send_at, content, NOW, LIMIT)
    assert reply.startswith("554 5.6.0 ") and "X-Relay-Send-At" in reply


def test_header_beyond_the_limit_is_refused_554_560() -> None:
    """A time beyond delivery.max_schedule: 554 5.6.0."""
    content = b"X-Relay-Send-At: 2027-02-01T00:00:00Z\r\n\r\nbody\r\n"
    assert refusal(message_send_at, content, NOW, LIMIT).startswith("554 5.6.0 ")


def test_two_headers_are_refused_554_560() -> None:
    """Two X-Relay-Send-At headers are ambiguous: 554 5.6.0."""
    content = (b"X-Relay-Send-At: 2026-12-05T09:00:00Z\r\n"
               b"X-Relay-Send-At: 2026-12-06T09:00:00Z\r\n\r\nbody\r\n")
    assert "more than one" in refusal(message_send_at, content, NOW, LIMIT)


def test_rfc_5322_date_without_a_zone_is_utc() -> None:
    """RFC 5322's -0000 (no zone information) is read as UTC."""
    assert parse_date_time("Sat, 05 Dec 2026 09:00:00 -0000") == NOW + 21 * 3600


def test_time_arguments_take_rfc_3339_and_local_time() -> None:
    """--send-at and friends: RFC 3339 exactly; without an offset, local time."""
    assert parse_time("2026-12-05T09:00:00Z") == NOW + 21 * 3600
    import datetime
    local = datetime.datetime(2026, 12, 5, 9, 0).timestamp()
    assert parse_time("2026-12-05 09:00") == local
    with pytest.raises(ValueError, match="expected a time"):
        parse_time("next tuesday")


def test_when_is_a_duration_from_now_or_a_time() -> None:
    """reschedule's TIME|DURATION: 5m and 90 (seconds) from now, or a time."""
    assert parse_when("5m", NOW) == NOW + 300
    assert parse_when("90", NOW) == NOW + 90
    assert parse_when("2026-12-05T09:00:00Z", NOW) == NOW + 21 * 3600
    with pytest.raises(ValueError, match="duration like 5m"):
        parse_when("-5m", NOW)


def test_since_is_a_duration_before_now_or_a_time() -> None:
    """--since 1h is an hour ago; a time is that time."""
    assert parse_since("1h", NOW) == NOW - 3600
    assert parse_since("2026-12-04T00:00:00Z", NOW) == NOW - 12 * 3600


def test_hold_parameter_rounds_up_to_the_next_whole_second() -> None:
    """sendmail's HOLDUNTIL is never earlier than the time asked for."""
    assert hold_parameter(NOW + 0.2) == "HOLDUNTIL=2026-12-04T12:00:01Z"
    assert hold_parameter(NOW) == f"HOLDUNTIL={rfc3339(NOW)}"

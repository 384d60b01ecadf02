"""The RFC 3464 notice builder (relay.dsn), read back with Python's email package, field by
field."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage, Message

import pytest

from relay import dsn
from relay.entry import Attempt, Entry, Queue, Recipient, Status

ORIGINAL_HEAD = (b"From: app@example.com\r\nTo: one@example.com\r\nSubject: invoice 42\r\n"
                 b"Message-ID: <orig@example.com>\r\n")
ARRIVED = 1_700_000_000.0
NOW = 1_700_000_600.0


def failed_entry(*recipients: Recipient, sender: str = "app@example.com") -> Entry:
    return Entry(id="18BCFE5680000DEADBEEF", queue=Queue.FAILED, sender=sender,
                 recipients=recipients, arrived=ARRIVED, size=100,
                 attempts=(Attempt(ARRIVED + 60, "smtp.mailgun.org:587", "550 ...", 0.2),))


def build(entry: Entry, to: str = "app@example.com") -> EmailMessage:
    raw = dsn.build(entry, ORIGINAL_HEAD, notice_id="18BCFE5A00000CAFEF00D", hostname="relay.local",
                    from_address="MAILER-DAEMON@relay.local", to_address=to, now=NOW)
    assert raw.count(b"\n") == raw.count(b"\r\n"), "every line ends in CRLF"
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def status_blocks(message: EmailMessage) -> list[Message]:
    part = list(message.iter_parts())[1]
    assert part.get_content_type() == "message/delivery-status"
    payload = part.get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


REFUSED = Recipient("one@example.com", Status.FAILED, "550 5.1.1 No such user")
SENT = Recipient("two@example.com", Status.SENT, "250 2.0.0 Ok")
EXPIRED = Recipient("three@example.com", Status.FAILED,
                    "expired after 9 attempts: 451 4.2.0 Mailbox busy, try later")


def test_notice_is_a_multipart_report_of_three_parts() -> None:
    """multipart/report; report-type=delivery-status: text, delivery-status, headers."""
    message = build(failed_entry(REFUSED))
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in message.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_top_level_headers() -> None:
    """From the configured address, to the notice's recipient, dated, never answered back."""
    message = build(failed_entry(REFUSED), to="ops@example.com")
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.local"
    assert message["To"] == "ops@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Message-ID"] == "<18BCFE5A00000CAFEF00D@relay.local>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW


def test_per_message_fields() -> None:
    """Reporting-MTA names this host; Arrival-Date is the message's arrival."""
    per_message = status_blocks(build(failed_entry(REFUSED)))[0]
    assert per_message["Reporting-MTA"] == "dns; relay.local"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVED
    assert per_message["X-Relay-Queue-ID"] == "18BCFE5680000DEADBEEF"


def test_one_block_per_failed_recipient_and_none_for_the_sent_one() -> None:
    """Refused and expired recipients each have a block; the sent one is not reported."""
    blocks = status_blocks(build(failed_entry(REFUSED, SENT, EXPIRED)))[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; one@example.com",
                                                      "rfc822; three@example.com"]
    assert all(b["Action"] == "failed" for b in blocks)


def test_refused_recipient_fields() -> None:
    """Status from the reply's enhanced code; Diagnostic-Code the upstream's reply."""
    block = status_blocks(build(failed_entry(REFUSED)))[1]
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert block["Remote-MTA"] == "dns; smtp.mailgun.org"
    assert email.utils.parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() \
        == ARRIVED + 60


def test_expired_recipient_fields() -> None:
    """Status 4.4.7 (delivery time expired); the diagnostic is the last reply heard."""
    block = status_blocks(build(failed_entry(EXPIRED)))[1]
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"] == "smtp; 451 4.2.0 Mailbox busy, try later"


def test_original_headers_are_attached() -> None:
    """The third part holds the original header section, and no body."""
    part = list(build(failed_entry(REFUSED)).iter_parts())[2]
    headers = email.message_from_string(part.get_content())
    assert headers["Subject"] == "invoice 42"
    assert headers["Message-ID"] == "<orig@example.com>"


def test_human_readable_part_names_each_failure() -> None:
    """The text part gives the queue ID and each failed recipient with its reply."""
    text = next(build(failed_entry(REFUSED, SENT, EXPIRED)).iter_parts()).get_content()
    assert "18BCFE5680000DEADBEEF" in text
    assert "<one@example.com>: 550 5.1.1 No such user" in text
    assert "<three@example.com>: expired after 9 attempts" in text
    assert "two@example.com" not in text


@pytest.mark.parametrize("reply, status", [
    ("550 5.7.1 Relaying denied", "5.7.1"),
    ("554 Transaction failed", "5.0.0"),
    ("553 5.1.3 address cannot be sent safely: x", "5.1.3"),
    ("connection failed: refused", "5.0.0"),
    ("expired after 3 attempts: connection failed: refused", "4.4.7"),
    (None, "5.0.0"),
])
def test_status_codes(reply: str | None, status: str) -> None:
    assert dsn.status_code(reply) == status


def test_failure_without_an_smtp_reply_has_a_relay_diagnostic() -> None:
    """A refused connection is no SMTP reply: Diagnostic-Code type X-Relay."""
    assert dsn.diagnostic("expired after 3 attempts: connection failed: refused") == \
        "X-Relay; connection failed: refused"


def test_non_ascii_recipient_is_encoded_as_rfc_6533_utf8_address() -> None:
    """The delivery-status part stays 7-bit: ü becomes \\x{FC}; the notice's To: stays UTF-8."""
    recipient = Recipient("j\u00fcrgen@example.com", Status.FAILED, "550 5.1.1 unknown")
    message = build(failed_entry(recipient, sender="s\u00e9n@example.com"),
                    to="s\u00e9n@example.com")
    assert status_blocks(message)[1]["Final-Recipient"] == "utf-8; j\\x{FC}rgen@example.com"
    assert message["To"] == "s\u00e9n@example.com"

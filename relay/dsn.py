"""Delivery status notifications (RFC 3464): the bounce notice for one failed message.

Pure: built from the entry, its original header section and the values passed in (no
clock, no host lookup). One notice covers every failed recipient of the message:

    multipart/report; report-type=delivery-status
      text/plain                  what happened, for a person
      message/delivery-status     Reporting-MTA, Arrival-Date; per recipient
                                  Final-Recipient, Action: failed, Status, Diagnostic-Code
      text/rfc822-headers         the original message's header section
"""

from __future__ import annotations

import email.utils
import re
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTPUTF8, Policy
from io import BytesIO
from typing import cast

from . import policy
from .entry import Entry, Recipient, Status
from .text import header_safe

EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
_REPLY = re.compile(r"^([245])\d\d(?:[ -]|$)")
_ENHANCED = re.compile(r"^[245]\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})\b")


def failed(entry: Entry) -> tuple[Recipient, ...]:
    """The recipients a notice reports: those that failed for good or expired."""
    return tuple(r for r in entry.recipients if r.status is Status.FAILED)


def status_code(reply: str | None) -> str:
    """RFC 3464's Status: the reply's enhanced code, 4.4.7 for an expired recipient, else
    the class of its basic code (5.0.0)."""
    if policy.is_expiry(reply):
        return EXPIRED_STATUS
    text = reply or ""
    enhanced = _ENHANCED.match(text)
    if enhanced:
        return ".".join(enhanced.groups())
    basic = _REPLY.match(text)
    return f"{basic.group(1)}.0.0" if basic and basic.group(1) != "2" else "5.0.0"


def diagnostic(reply: str | None) -> str:
    """Diagnostic-Code: `smtp; <reply>` for the upstream's SMTP reply, `X-Relay; <text>`
    for a failure without one (a refused connection, a timeout)."""
    text = " ".join((reply or "no reply").split())
    if policy.is_expiry(text):
        text = text.split(": ", 1)[1] if ": " in text else text
    return f"smtp; {text}" if _REPLY.match(text) else f"X-Relay; {text}"


def final_recipient(address: str) -> str:
    """Final-Recipient: `rfc822; address`, or for an address that is not ASCII, RFC 6533's
    `utf-8; ` with each character outside printable ASCII (and + = \\) as \\x{HEX}."""
    if address.isascii() and address.isprintable():
        return f"rfc822; {address}"
    encoded = "".join(c if c.isascii() and c.isprintable() and c not in "+=\\ "
                      else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {encoded}"


def build(entry: Entry, original_head: bytes, *, notice_id: str, hostname: str,
          from_address: str, to_address: str, now: float) -> bytes:
    """The notice about `entry` as a message (CRLF lines), to `to_address`."""
    report = MIMEMultipart("report", report_type="delivery-status",
                           boundary=f"{notice_id}.{int(now)}/{hostname}")
    report["From"] = email.utils.formataddr(("Mail Delivery System", from_address))
    report["To"] = to_address
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(now, usegmt=True)
    report["Message-ID"] = f"<{notice_id}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: never to be answered in turn
    report.preamble = "This is a MIME-encapsulated message."
    recipients = failed(entry)
    explanation = _explanation(entry, recipients, hostname)
    report.attach(MIMEText(explanation, "plain",
                           "us-ascii" if explanation.isascii() else "utf-8"))
    report.attach(_delivery_status(entry, recipients, hostname))
    headers = original_head.decode("utf-8", "replace").replace("\r\n", "\n")
    charset = "us-ascii" if headers.isascii() else "utf-8"
    report.attach(MIMEText(headers, "rfc822-headers", charset))
    out = BytesIO()
    # CRLF lines; a To: address that is not ASCII stays UTF-8 (RFC 6532), not an encoded word.
    generator = BytesGenerator(out, policy=cast("Policy[Message]", SMTPUTF8), mangle_from_=False)
    generator.flatten(report)
    return out.getvalue()


def _explanation(entry: Entry, recipients: tuple[Recipient, ...], hostname: str) -> str:
    sender = f"<{entry.sender}>" if entry.sender else "<>"
    lines = [
        f"This is the mail relay at {hostname}.",
        "",
        "Your message could not be delivered to the recipients below, and the relay has",
        "given up on them. The delivery status report and the message's headers follow.",
        "",
        f"Queue ID: {entry.id}",
        f"Sender:   {sender}",
        f"Arrived:  {email.utils.formatdate(entry.arrived, usegmt=True)}",
        "",
    ]
    for recipient in recipients:
        reply = " ".join((recipient.reply or "no reply").split())
        lines.append(f"<{recipient.address}>: {reply}")
    return "\n".join(lines) + "\n"


def _delivery_status(entry: Entry, recipients: tuple[Recipient, ...],
                     hostname: str) -> Message:
    """The message/delivery-status part: per-message fields, then a block per recipient."""
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Relay-Queue-ID"] = entry.id
    per_message["Arrival-Date"] = email.utils.formatdate(entry.arrived, usegmt=True)
    blocks: list[Message | str] = [per_message]
    last = entry.attempts[-1] if entry.attempts else None
    for recipient in recipients:
        block = Message()
        block["Final-Recipient"] = final_recipient(recipient.address)
        block["Action"] = "failed"
        block["Status"] = status_code(recipient.reply)
        # The delivery-status part is 7-bit: its fields are printable ASCII.
        if last is not None:
            remote = header_safe(last.relay.rsplit(":", 1)[0], ascii_only=True, spaces=True)
            block["Remote-MTA"] = f"dns; {remote}"
            block["Last-Attempt-Date"] = email.utils.formatdate(last.at, usegmt=True)
        block["Diagnostic-Code"] = header_safe(diagnostic(recipient.reply), ascii_only=True,
                                               spaces=True)
        blocks.append(block)
    status = Message()
    status.set_type("message/delivery-status")
    status.set_payload(blocks)
    return status

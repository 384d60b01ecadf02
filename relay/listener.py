"""The SMTP listener: a thin aiosmtpd adapter that validates, spools, wakes delivery, replies.

It checks that the client may connect (allow networks, connection limit), validates the
sender and each recipient with email-validator (syntax only, never DNS), enforces the
size and recipient limits, prepends a Received: header and hands the message to the
spool in a worker thread. `250 ... queued as ID` is sent only after the spool returned,
that is after the entry is durable. Our own failures reach the client as 451/452, never
as aiosmtpd's default `500 Error: (exception text)`. It never delivers.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from email_validator import EmailNotValidError, validate_email

from .config import IPNetwork, ListenConfig
from .data import read_data
from .entry import Entry
from .errors import SpoolError, SpoolFull
from .faults import fault_point
from .headers import field_value, split_header
from .log import log_event
from .spool import Spool, new_id

logger = logging.getLogger("relay.listener")

MAX_ADDRESS_OCTETS = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets including < and >
MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 4.5.3.1.1

# aiosmtpd answers some limits itself, without RFC 3463 enhanced status codes; these are
# the replies the contract promises instead (Postfix's wording).
_ENHANCED_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Error: message size exceeds fixed maximum message size",
    "500 Command line too long": "500 5.5.2 Error: command line too long",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "501 Error: SMTPUTF8 disabled": "501 5.5.4 Error: SMTPUTF8 disabled",
}


def address_problem(address: str, smtputf8: bool) -> str | None:
    """Why `address` is not a syntactically valid mailbox, or None if it is. No DNS."""
    if len(address.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        return f"address longer than {MAX_ADDRESS_OCTETS} octets"
    local, _, _ = address.rpartition("@")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        return f"local part longer than {MAX_LOCAL_PART_OCTETS} octets"
    try:
        validate_email(address, check_deliverability=False, globally_deliverable=False,
                       allow_quoted_local=True, allow_domain_literal=True, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return str(exc)
    if not smtputf8 and not address.isascii():
        return "non-ASCII address without the SMTPUTF8 parameter"
    return None


class Gate:
    """Admission at connect time: allowed client networks and the connection limit."""

    def __init__(self, allow: tuple[IPNetwork, ...], max_connections: int) -> None:
        self.allow = allow
        self.max_connections = max_connections
        self.active = 0

    def admit(self, peer: Any) -> str | None:
        """None if the client may proceed (and is counted), else the reply to refuse it."""
        if not self.allows(peer):
            return "554 5.7.1 Error: client not authorized to submit mail"
        if self.active >= self.max_connections:
            return "421 4.7.0 Error: too many connections"
        self.active += 1
        return None

    def allows(self, peer: Any) -> bool:
        if not isinstance(peer, tuple) or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    def release(self) -> None:
        self.active -= 1


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with admission control, a 421 on idle timeout, and enhanced codes."""

    def __init__(self, handler: Handler, gate: Gate, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._gate = gate
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection, not the STARTTLS re-entry
            refusal = self._gate.admit(transport.get_extra_info("peername"))
            if refusal is not None:
                log_event(logging.INFO, None, event="refused",
                          client=transport.get_extra_info("peername"), reply=refusal,
                          status="refused")
                transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._gate.release()
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2.7: say why before closing an idle session.
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 Error: timeout exceeded\r\n")  # type: ignore[attr-defined]
        super()._timeout_cb()

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA command with the body read in blocks (see relay/data.py)."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, reply = await read_data(self._reader, self.data_size_limit,
                                             self.line_length_limit)
        except asyncio.CancelledError:
            self._writer.close()  # the client went away mid-DATA, or the session timed out
            raise
        if reply is None:  # within the limits: the handler spools it and says what to reply
            self.envelope.content = self.envelope.original_content = content
            reply = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(reply)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _ENHANCED_REPLIES.get(status, status)
        await super().push(status)


class Handler:
    """The aiosmtpd hooks. `on_stored` is told of each entry once it is durable."""

    def __init__(self, spool: Spool, config: ListenConfig, on_stored: Callable[[Entry], None],
                 hostname: str, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.config = config
        self.on_stored = on_stored
        self.hostname = hostname
        self.clock = clock

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands in order from a buffered stream, so pipelining works;
        # it just does not say so. Add both before the final "250 HELP".
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        sender = "" if address == "<>" else address
        if sender:
            problem = address_problem(sender, envelope.smtp_utf8)
            if problem is not None:
                return f"553 5.1.3 Error: bad sender address syntax: {problem}"
        declared = _declared_size(mail_options)
        try:
            # One statvfs: quicker than a round trip to a worker thread.
            self.spool.check_room(declared)
        except SpoolFull:
            return "452 4.3.1 Error: insufficient system storage"
        except SpoolError:
            return "452 4.3.1 Error: queue file write error"
        # Kept as "<>" in the envelope: aiosmtpd takes an empty mail_from for "no MAIL yet".
        envelope.mail_from = sender or "<>"
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        problem = address_problem(address, envelope.smtp_utf8)
        if problem is not None:
            return f"553 5.1.3 Error: bad recipient address syntax: {problem}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes) and isinstance(envelope.mail_from, str)
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        now = self.clock()
        entry_id = new_id(now)
        added = [self._received_header(session, envelope, entry_id, now)]
        message_id = field_value(split_header(content)[0], "Message-ID")
        if message_id is None:
            # As Postfix's cleanup does: every attempt then carries the same Message-ID,
            # so a duplicate delivery can be recognised downstream.
            message_id = f"<{entry_id}@{self.hostname}>"
            added.append(f"Message-ID: {message_id}\r\n".encode())
        try:
            entry = await asyncio.to_thread(
                self.spool.store, entry_id, sender, list(envelope.rcpt_tos),
                [*added, content], now, bool(envelope.smtp_utf8))
        except SpoolFull:
            return "452 4.3.1 Error: insufficient system storage"
        except SpoolError as exc:
            log_event(logging.ERROR, entry_id, status="refused", reason=str(exc))
            return "452 4.3.1 Error: queue file write error"
        log_event(logging.INFO, entry.id, client=_client_name(session),
                  **{"from": entry.sender, "message-id": message_id}, size=entry.size,
                  nrcpt=len(entry.recipients), status="queued")
        self.on_stored(entry)
        fault_point("after-rename-before-250")
        return f"250 2.0.0 Ok: queued as {entry.id}"

    async def handle_exception(self, error: Exception) -> str:
        logger.error("SMTP session error: %s: %s", type(error).__name__, error,
                     exc_info=(type(error), error, error.__traceback__))
        return "451 4.3.0 Error: internal error, try again later"

    def _received_header(self, session: Session, envelope: Envelope, entry_id: str,
                         now: float) -> bytes:
        """RFC 5321 4.4 trace header. Only sanitized text goes in: a client's HELO can
        carry CR or LF, which must never become a header of its own."""
        helo = _sanitize(session.host_name or "unknown")
        protocol = "UTF8SMTP" if envelope.smtp_utf8 else ("ESMTP" if session.extended_smtp else "SMTP")
        stamp = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
        recipient = f"\r\n\tfor <{_sanitize(envelope.rcpt_tos[0])}>" if len(envelope.rcpt_tos) == 1 else ""
        header = (f"Received: from {helo} ({_client_name(session)})\r\n"
                  f"\tby {self.hostname} (relay) with {protocol} id {entry_id}{recipient};\r\n"
                  f"\t{stamp}\r\n")
        return header.encode("utf-8")


# Commands that carry no mail are limited per session, as with aiosmtpd's own suggestion
# for slowloris clients (a NOOP just before each timeout would hold a slot forever).
# Commands that do carry mail are not: one connection may submit any number of messages.
COMMAND_CALL_LIMIT = {"NOOP": 20, "VRFY": 20, "EXPN": 20, "HELP": 20, "EHLO": 20, "HELO": 20,
                      "*": 2**31}


class ServerFactory:
    """Makes one protocol per connection from the current listen config, so a reload's new
    limits apply to every connection made after it (sessions in progress keep theirs)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.gate = Gate(handler.config.allow, handler.config.max_connections)

    def reconfigure(self, config: ListenConfig) -> None:
        self.handler.config = config
        self.gate.allow = config.allow
        self.gate.max_connections = config.max_connections

    def __call__(self) -> RelaySMTP:
        config = self.handler.config
        return RelaySMTP(self.handler, self.gate, data_size_limit=config.max_message_size,
                         enable_SMTPUTF8=True, decode_data=False,
                         hostname=self.handler.hostname, ident="ESMTP", timeout=config.timeout,
                         command_call_limit=COMMAND_CALL_LIMIT)


def local_hostname() -> str:
    """The name we greet with; gethostname, not getfqdn, which may block on DNS."""
    return _sanitize(socket.gethostname()) or "localhost"


def _declared_size(mail_options: list[str]) -> int:
    for option in mail_options:
        name, _, value = option.partition("=")
        if name == "SIZE" and value.isdigit():
            return int(value)
    return 0


def _client_name(session: Session) -> str:
    peer = session.peer
    return f"[{peer[0]}]" if isinstance(peer, tuple) and peer else "unknown"


def _sanitize(text: str) -> str:
    """Printable, space-free, bounded: safe inside a header or a log line."""
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
    return cleaned[:255]

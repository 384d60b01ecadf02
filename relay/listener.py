"""The listener's policy: who may connect, which addresses pass, and spooling each message.

aiosmtpd speaks the protocol (relay.smtp_server) and asks this handler at each step through
its hooks. It checks that the client may connect (allowed networks, connection limit),
validates the sender and each recipient with email-validator (syntax only, never DNS),
enforces the recipient limit and free space, prepends a Received: header, and hands the
message to the spool writer's thread. `250 ... queued as ID` is sent only after the spool
returned, that is after the entry is durable; a spool failure is answered 451 or 452, an
error of ours 451, never a traceback. It never delivers.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiosmtpd.smtp import Session
from email_validator import EmailNotValidError, validate_email

from .config import IPNetwork, ListenConfig
from .entry import Entry, NewEntry
from .errors import SpoolError, SpoolFull
from .faults import fault_point
from .headers import field_value, split_header
from .log import log_event
from .smtp_server import RelayEnvelope, RelaySMTP
from .spool import Draft, Spool, is_unsafe_address, new_id
from .writer import SpoolWriter

logger = logging.getLogger("relay.listener")

MAX_ADDRESS_OCTETS = 254  # RFC 5321 4.5.3.1.3: a path is 256 octets including < and >
MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 4.5.3.1.1
# A message larger than this goes to its spool file as it arrives rather than into memory,
# so that memory does not grow with message size times sessions.
SPILL_BYTES = 1024 * 1024
INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
NO_ROOM = "452 4.3.1 Error: insufficient system storage"
WRITE_ERROR = "452 4.3.1 Error: queue file write error"
NULL_PATH = "<>"  # aiosmtpd's mail_from for the null reverse-path


# An application sends from a handful of addresses, often to the same few: the answer for
# each is kept (a pure function of its arguments) instead of running email-validator's
# 30 us again for every MAIL and RCPT.
@functools.lru_cache(maxsize=4096)
def address_problem(address: str, smtputf8: bool) -> str | None:
    """Why `address` is not a syntactically valid mailbox, or None if it is. No DNS."""
    if len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_OCTETS:
        return f"address longer than {MAX_ADDRESS_OCTETS} octets"
    local, _, _ = address.rpartition("@")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART_OCTETS:
        return f"local part longer than {MAX_LOCAL_PART_OCTETS} octets"
    try:
        validate_email(address, check_deliverability=False, globally_deliverable=False,
                       allow_quoted_local=True, allow_domain_literal=True, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return str(exc)
    if not smtputf8 and not address.isascii():
        return "non-ASCII address without the SMTPUTF8 parameter"
    if is_unsafe_address(address):
        return "control characters, '<' or '>' are not relayed"
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
        if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
            return False
        return _allowed(peer[0], self.allow)

    def release(self) -> None:
        self.active -= 1


@functools.lru_cache(maxsize=1024)
def _allowed(host: str, allow: tuple[IPNetwork, ...]) -> bool:
    """Whether a client address is in the allowed networks; remembered, as the same few
    local addresses connect again and again."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in allow)


class Message:
    """One message's content as DATA delivers it: kept in memory, or once it passes
    SPILL_BYTES written to its spool file as it comes (relay.spool.Draft). The headers the
    relay adds go first; they are made when the message's header is known: at its end, or
    when it is spilled."""

    def __init__(self, spool: Spool, entry_id: str, sender: str, recipients: tuple[str, ...],
                 arrived: float, smtputf8: bool,
                 added_headers: Callable[[list[bytes]], list[bytes]]) -> None:
        self.spool = spool
        self.id = entry_id
        self.sender = sender
        self.recipients = recipients
        self.arrived = arrived
        self.smtputf8 = smtputf8
        self._added_headers = added_headers
        self._parts: list[bytes] = []
        self._size = 0
        self._draft: Draft | None = None
        self.error: SpoolError | None = None  # the spool failed while the content came in
        self.message_id: str | None = None
        self._handed_over = False  # to the spool writer, which owns the draft from then on

    def write(self, content: bytes) -> None:
        if self.error is not None:
            return
        if self._draft is None:
            self._parts.append(content)
            self._size += len(content)
            if self._size > SPILL_BYTES:
                self._spill()
            return
        try:
            self._draft.write([content])
        except SpoolError as exc:
            self._fail(exc)

    def _spill(self) -> None:
        parts = self._with_added_headers()
        self._parts = []
        try:
            self._draft = self.spool.draft(self._new_entry(()))
            self._draft.write(parts)
        except SpoolError as exc:
            self._fail(exc)

    def _fail(self, error: SpoolError) -> None:
        self.error = error
        self.discard()

    def _with_added_headers(self) -> list[bytes]:
        content = b"".join(self._parts)
        head, _ = split_header(content)
        added = self._added_headers(head)
        self.message_id = field_value(head, "Message-ID") or field_value(added, "Message-ID")
        return [*added, content]

    def new_entry(self) -> NewEntry:
        """The entry to store, once the content is complete; the draft is the writer's
        from now on."""
        self._handed_over = True
        if self._draft is not None:
            return replace(self._new_entry(()), draft=self._draft)
        return self._new_entry(tuple(self._with_added_headers()))

    def _new_entry(self, parts: tuple[bytes, ...]) -> NewEntry:
        return NewEntry(self.id, self.sender, self.recipients, parts, self.arrived,
                        self.smtputf8, message_id=self.message_id)

    def discard(self) -> None:
        self._parts = []
        if self._draft is not None and not self._handed_over:
            self._draft.discard()
            self._draft = None


class Handler:
    """The listener's policy, in aiosmtpd's handler hooks. `on_stored` is told of each
    entry once it is durable, with the content it holds in memory (none if spilled)."""

    def __init__(self, spool: Spool, writer: SpoolWriter, config: ListenConfig, gate: Gate,
                 on_stored: Callable[[Entry, tuple[bytes, ...]], None], hostname: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.writer = writer
        self.config = config
        self.gate = gate
        self.on_stored = on_stored
        self.hostname = hostname
        self.clock = clock

    def __dir__(self) -> list[str]:
        """For aiosmtpd's constructor, which looks for hooks and AUTH methods by listing
        and reading every attribute of the handler at each connection: those only."""
        return _HOOK_NAMES

    # --- connection (relay.smtp_server asks) ------------------------------------------------

    def admit(self, peer: Any) -> str | None:
        refusal = self.gate.admit(peer)
        if refusal is not None:
            log_event(logging.INFO, None, event="refused", client=peer, reply=refusal,
                      status="refused")
        return refusal

    def release(self) -> None:
        self.gate.release()

    # --- aiosmtpd's hooks -------------------------------------------------------------------

    def extensions(self) -> list[str]:
        """EHLO's keywords besides aiosmtpd's: the session answers pipelined commands in
        order, and every reply carries an RFC 3463 code."""
        return ["PIPELINING", "ENHANCEDSTATUSCODES"]

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: RelayEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if address != NULL_PATH:
            problem = address_problem(address, envelope.smtp_utf8)
            if problem is not None:
                return f"553 5.1.3 Error: bad sender address syntax: {problem}"
        try:
            # One statvfs: quicker than a round trip to a worker thread.
            self.spool.check_room(envelope.declared_size)
        except SpoolFull:
            return NO_ROOM
        except SpoolError:
            return WRITE_ERROR
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: RelayEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        if address.lower() == "postmaster":
            # RFC 5321 4.1.1.3: <Postmaster> without a domain is always accepted.
            address = f"postmaster@{self.hostname}"
        problem = address_problem(address, envelope.smtp_utf8)
        if problem is not None:
            return f"553 5.1.3 Error: bad recipient address syntax: {problem}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """A bug of ours must not reach the client as text (aiosmtpd's default is 500 with
        the exception's)."""
        logger.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        return INTERNAL_ERROR

    # --- DATA (relay.smtp_server reads it) ----------------------------------------------------

    def begin_message(self, session: Session, envelope: RelayEnvelope) -> Message:
        now = self.clock()
        entry_id = new_id(now)
        sender = "" if envelope.mail_from == NULL_PATH else (envelope.mail_from or "")
        recipients = tuple(envelope.rcpt_tos)

        def added_headers(head: list[bytes]) -> list[bytes]:
            added = [self._received_header(session, envelope.smtp_utf8, recipients, entry_id,
                                           now)]
            if field_value(head, "Message-ID") is None:
                # As Postfix's cleanup does: every attempt then carries the same
                # Message-ID, so a duplicate delivery can be recognised downstream.
                added.append(f"Message-ID: <{entry_id}@{self.hostname}>\r\n".encode())
            return added
        return Message(self.spool, entry_id, sender, recipients, now, envelope.smtp_utf8,
                       added_headers)

    async def end_message(self, session: Session, envelope: RelayEnvelope,
                          message: Message) -> str:
        if message.error is not None:
            return NO_ROOM if isinstance(message.error, SpoolFull) else WRITE_ERROR
        new = message.new_entry()
        try:
            entry = await self.writer.store(new)
        except SpoolFull:
            return NO_ROOM
        except SpoolError as exc:
            log_event(logging.ERROR, new.id, status="refused", reason=str(exc))
            return WRITE_ERROR
        fault_point("after-rename-before-250")
        # Logged and handed to delivery just after the 250 is written, not before: the
        # client waits for neither.
        asyncio.get_running_loop().call_soon(self._stored, entry, new.parts,
                                             _client_name(session), message.message_id)
        return f"250 2.0.0 Ok: queued as {entry.id}"

    def _stored(self, entry: Entry, parts: tuple[bytes, ...], client: str,
                message_id: str | None) -> None:
        log_event(logging.INFO, entry.id, client=client,
                  **{"from": entry.sender, "message-id": message_id}, size=entry.size,
                  nrcpt=len(entry.recipients), status="queued")
        self.on_stored(entry, parts)

    def _received_header(self, session: Session, smtputf8: bool, recipients: tuple[str, ...],
                         entry_id: str, now: float) -> bytes:
        """RFC 5321 4.4 trace header. Only sanitised text goes in: a client's HELO can carry
        CR or LF, which must never become a header of its own, or 8-bit text, which must
        not make a 7-bit message 8-bit."""
        helo = _printable_ascii(session.host_name or "unknown")
        protocol = "UTF8SMTP" if smtputf8 else ("ESMTP" if session.extended_smtp else "SMTP")
        stamp = _date(int(now))
        recipient = (f"\r\n\tfor <{_printable(recipients[0])}>" if len(recipients) == 1
                     else "")
        header = (f"Received: from {helo} ({_client_name(session)})\r\n"
                  f"\tby {self.hostname} (relay) with {protocol} id {entry_id}{recipient};\r\n"
                  f"\t{stamp}\r\n")
        return header.encode("utf-8")


_HOOK_NAMES = [name for name in dir(Handler) if name.startswith(("handle_", "auth_"))]


class ServerFactory:
    """Makes one session per connection from the current listen config, so a reload's new
    limits apply to every connection made after it (sessions in progress keep theirs)."""

    def __init__(self, spool: Spool, writer: SpoolWriter, config: ListenConfig,
                 on_stored: Callable[[Entry, tuple[bytes, ...]], None], hostname: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.gate = Gate(config.allow, config.max_connections)
        self.handler = Handler(spool, writer, config, self.gate, on_stored, hostname, clock)

    def reconfigure(self, config: ListenConfig) -> None:
        self.handler.config = config
        self.gate.allow = config.allow
        self.gate.max_connections = config.max_connections

    def __call__(self) -> RelaySMTP:
        return RelaySMTP(self.handler, self.handler.config, self.handler.hostname)


def local_hostname() -> str:
    """The name we greet with; gethostname, not getfqdn, which may block on DNS."""
    return _printable_ascii(socket.gethostname()) or "localhost"


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 date of a second: every message received in the same second shares it."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def _client_name(session: Session) -> str:
    peer = session.peer
    return f"[{peer[0]}]" if isinstance(peer, tuple) and peer else "unknown"


def _printable(text: str) -> str:
    """Printable, space-free, bounded: safe inside a header or a log line."""
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
    return cleaned[:255]


def _printable_ascii(text: str) -> str:
    """As _printable, and ASCII: any name a client gives itself (Postfix accepts them all,
    Windows hosts send underscores) without 8-bit text in a header of a 7-bit message."""
    return "".join(c if "!" <= c <= "~" else "?" for c in text)[:255]

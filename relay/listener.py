"""The listener's policy: who may connect, which addresses pass, and spooling each message.

The SMTP protocol (relay.smtpd) asks it at each step. It checks that the client may
connect (allow networks, connection limit), has the sender and each recipient judged by
the address rules (relay.addresses: syntax, never DNS; aliases; sender domains), enforces
the recipient limit and free space, applies the rules' rewriting once the message is in,
prepends a Received: header and hands the message to the spool writer's thread.
`250 ... queued as ID` is sent only after the spool returned, that is after the entry is
durable; a spool failure is answered 452. It never delivers.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from . import addresses
from .addresses import Rules
from .config import IPNetwork, ListenConfig
from .entry import Entry, NewEntry
from .errors import SpoolError, SpoolFull
from .faults import fault_point
from .headers import field_value, split_header
from .log import log_event
from .smtpd import Session, SMTPServer, Transaction
from .spool import Spool, new_id
from .writer import SpoolWriter

logger = logging.getLogger("relay.listener")

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


class Handler:
    """The listener's policy, asked by the SMTP protocol (relay.smtpd) at each step.
    `on_stored` is told of each entry once it is durable, with the content it holds."""

    def __init__(self, spool: Spool, writer: SpoolWriter, config: ListenConfig, gate: Gate,
                 on_stored: Callable[[Entry, tuple[bytes, ...]], None], rules: Rules,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.writer = writer
        self.config = config
        self.gate = gate
        self.on_stored = on_stored
        self.rules = rules
        self.clock = clock

    @property
    def hostname(self) -> str:
        """The relay's name (addresses.hostname): greeting, Received: and Message-IDs."""
        return self.rules.hostname

    def connect(self, peer: Any) -> str | None:
        refusal = self.gate.admit(peer)
        if refusal is not None:
            log_event(logging.INFO, None, event="refused", client=peer, reply=refusal,
                      status="refused")
        return refusal

    def disconnect(self) -> None:
        self.gate.release()

    def mail(self, session: Session, transaction: Transaction) -> str | None:
        refusal = addresses.check_sender(self.rules, transaction.sender, transaction.smtputf8)
        if refusal is not None:
            return refusal
        try:
            # One statvfs: quicker than a round trip to a worker thread.
            self.spool.check_room(transaction.declared_size)
        except SpoolFull:
            return "452 4.3.1 Error: insufficient system storage"
        except SpoolError:
            return "452 4.3.1 Error: queue file write error"
        return None

    def rcpt(self, session: Session, transaction: Transaction, address: str) -> str | None:
        if len(transaction.recipients) >= self.config.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        return addresses.check_recipient(self.rules, address, transaction.smtputf8)

    async def data(self, session: Session, transaction: Transaction, content: bytes) -> str:
        head = split_header(content)[0]
        applied = addresses.apply(self.rules, transaction.sender, transaction.recipients,
                                  content, head)
        if isinstance(applied, str):
            return applied
        now = self.clock()
        entry_id = new_id(now)
        added = [self._received_header(session, transaction, entry_id, now)]
        message_id = field_value(head, "Message-ID")
        if message_id is None:
            # As Postfix's cleanup does: every attempt then carries the same Message-ID,
            # so a duplicate delivery can be recognised downstream.
            message_id = f"<{entry_id}@{self.hostname}>"
            added.append(f"Message-ID: {message_id}\r\n".encode())
        new = NewEntry(entry_id, applied.sender, applied.recipients,
                       (*added, *applied.parts), now, transaction.smtputf8,
                       applied.original_sender, applied.original_recipients)
        try:
            entry = await self.writer.store(new)
        except SpoolFull:
            return "452 4.3.1 Error: insufficient system storage"
        except SpoolError as exc:
            log_event(logging.ERROR, entry_id, status="refused", reason=str(exc))
            return "452 4.3.1 Error: queue file write error"
        fault_point("after-rename-before-250")
        # Logged and handed to delivery just after the 250 is written, not before: the
        # client waits for neither.
        asyncio.get_running_loop().call_soon(self._stored, entry, new.parts,
                                             _client_name(session), message_id)
        return f"250 2.0.0 Ok: queued as {entry.id}"

    def _stored(self, entry: Entry, parts: tuple[bytes, ...], client: str,
                message_id: str) -> None:
        rewritten: dict[str, str] = {}
        if entry.original_sender is not None:
            rewritten["orig_from"] = f"<{entry.original_sender}>"
        if entry.original_recipients is not None:
            rewritten["orig_to"] = ",".join(f"<{a}>" for a in entry.original_recipients)
        log_event(logging.INFO, entry.id, client=client,
                  **{"from": entry.sender, "message-id": message_id}, **rewritten,
                  size=entry.size, nrcpt=len(entry.recipients), status="queued")
        self.on_stored(entry, parts)

    def _received_header(self, session: Session, transaction: Transaction, entry_id: str,
                         now: float) -> bytes:
        """RFC 5321 4.4 trace header. Only sanitized text goes in: a client's HELO can
        carry CR or LF, which must never become a header of its own."""
        helo = _sanitize(session.host_name or "unknown")
        protocol = "UTF8SMTP" if transaction.smtputf8 else ("ESMTP" if session.extended else "SMTP")
        stamp = _date(int(now))
        recipients = transaction.recipients
        recipient = f"\r\n\tfor <{_sanitize(recipients[0])}>" if len(recipients) == 1 else ""
        header = (f"Received: from {helo} ({_client_name(session)})\r\n"
                  f"\tby {self.hostname} (relay) with {protocol} id {entry_id}{recipient};\r\n"
                  f"\t{stamp}\r\n")
        return header.encode("utf-8")


class ServerFactory:
    """Makes one protocol per connection from the current listen config, so a reload's new
    limits apply to every connection made after it (sessions in progress keep theirs)."""

    def __init__(self, spool: Spool, writer: SpoolWriter, config: ListenConfig,
                 on_stored: Callable[[Entry, tuple[bytes, ...]], None], rules: Rules,
                 clock: Callable[[], float] = time.time) -> None:
        self.gate = Gate(config.allow, config.max_connections)
        self.handler = Handler(spool, writer, config, self.gate, on_stored, rules, clock)

    def reconfigure(self, config: ListenConfig, rules: Rules) -> None:
        self.handler.config = config
        self.handler.rules = rules
        self.gate.allow = config.allow
        self.gate.max_connections = config.max_connections

    def __call__(self) -> SMTPServer:
        config = self.handler.config
        return SMTPServer(self.handler, self.handler.hostname, config.max_message_size,
                          config.timeout)


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 date of a second: every message received in the same second shares it."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def _client_name(session: Session) -> str:
    peer = session.peer
    return f"[{peer[0]}]" if isinstance(peer, tuple) and peer else "unknown"


def _sanitize(text: str) -> str:
    """Printable, space-free, bounded: safe inside a header or a log line."""
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
    return cleaned[:255]

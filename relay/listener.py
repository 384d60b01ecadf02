"""The listener's policy: who may connect, which addresses pass, and spooling each message.

aiosmtpd speaks the protocol (relay.smtp_server) and asks this handler at each step through
its hooks. It checks that the client may connect (allowed networks, connection limit), has
the sender and each recipient judged by the address rules (relay.addresses: syntax, never
DNS; aliases; sender domains) and the sender's route (relay.routing), enforces the
recipient limit and free space, reads a send time (relay.schedule), applies the rules'
rewriting once the message's header is in, prepends a Received: header, and hands the
message to the spool writer's thread. `250 ... queued as ID` is sent only after the spool
returned, that is after the entry is durable; a spool failure is answered 452, an error
of ours 451, never a traceback. It never delivers.
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
from dataclasses import replace
from typing import Any

from aiosmtpd.smtp import Session

from . import addresses, routing, schedule, tuning
from .addresses import Rules
from .config import Config, IPNetwork
from .entry import Entry, NewEntry
from .errors import ScheduleRefused, SpoolError, SpoolFull, WriterStopped
from .faults import fault_point
from .headers import field_value, split_header
from .log import log_event
from .metrics import Recorder, Refusal
from .smtp_server import RelayEnvelope, RelaySMTP
from .spool import Draft, Spool, new_id
from .text import header_safe
from .writer import SpoolWriter

logger = logging.getLogger("relay.listener")

INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
NO_ROOM = "452 4.3.1 Error: insufficient system storage"
WRITE_ERROR = "452 4.3.1 Error: queue file write error"
HEADER_TOO_LARGE = ("552 5.3.4 Error: message header section longer than "
                    f"{tuning.SPILL_BYTES} octets")
# How often free space is looked at again while a large message is written to disk.
ROOM_CHECK = 1024 * 1024
# The spool writer's thread died: the daemon is going down for systemd to restart it.
WRITER_STOPPED = "451 4.3.0 Error: the spool cannot be written now, try again later"
NULL_PATH = "<>"  # aiosmtpd's mail_from for the null reverse-path
MAX_TRACE_WORD = 255  # the HELO name and the recipient in Received:, cut to this length


class Admission:
    """Admission at connect time: allowed client networks and the connection limit."""

    def __init__(self, allow: tuple[IPNetwork, ...], max_connections: int) -> None:
        self.allow = allow
        self.max_connections = max_connections
        self.active = 0

    def admit(self, peer: Any) -> tuple[Refusal, str] | None:
        """None if the client may proceed (and is counted), else why and the reply."""
        if not self.allows(peer):
            return Refusal.ALLOW, "554 5.7.1 Error: client not authorized to submit mail"
        if self.active >= self.max_connections:
            return Refusal.CONNECTIONS, "421 4.7.0 Error: too many connections"
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
    tuning.SPILL_BYTES written to its spool file as it comes (relay.spool.Draft). `seal` turns
    the content so far, its header complete, into the entry to store (the relay's own
    headers added, the rules applied), or the reply that refuses it; it runs at the end,
    or when the message is spilled."""

    def __init__(self, spool: Spool, seal: Callable[[bytes], NewEntry | str]) -> None:
        self.spool = spool
        self._seal = seal
        self._parts: list[bytes] = []
        self._size = 0
        self._sealed: NewEntry | None = None  # the envelope of a spilled message
        self._draft: Draft | None = None
        self.error: SpoolError | None = None  # the spool failed while the content came in
        self.refusal: str | None = None  # the rules refused it while the content came in
        self._handed_over = False  # to the spool writer, which owns the draft from then on
        self._unchecked = 0  # octets written to the draft since free space was last looked at

    def write(self, content: bytes) -> None:
        if self.error is not None or self.refusal is not None:
            return
        if self._draft is None:
            self._parts.append(content)
            self._size += len(content)
            if self._size > tuning.SPILL_BYTES:
                self._spill()
            return
        try:
            self._draft.write([content])
            self._unchecked += len(content)
            if self._unchecked >= ROOM_CHECK:
                # MAIL checked free space against SIZE=, which clients need not send: a
                # large message is held to spool.min_free as it grows.
                self._unchecked = 0
                self.spool.check_room(0)
        except SpoolError as exc:
            self._fail(exc)

    def _spill(self) -> None:
        content = b"".join(self._parts)
        self._parts = []
        head, rest = split_header(content)
        if not rest and not content.endswith((b"\r\n\r\n", b"\n\n")) and \
                sum(map(len, head)) == len(content):
            # The rules read the header section: one that has not ended within the first
            # SPILL_BYTES could hide a From: or a send time from them.
            self.refusal = HEADER_TOO_LARGE
            return
        sealed = self._seal(content)
        if isinstance(sealed, str):
            self.refusal = sealed
            return
        self._sealed = replace(sealed, parts=())
        try:
            self.spool.check_room(sealed.size)
            self._draft = self.spool.draft(self._sealed)
            self._draft.write(list(sealed.parts))
        except SpoolError as exc:
            self._fail(exc)

    def _fail(self, error: SpoolError) -> None:
        self.error = error
        self.discard()

    def new_entry(self) -> NewEntry | str:
        """The entry to store, once the content is complete, or the reply refusing it;
        the draft is the writer's from now on."""
        if self.refusal is not None:
            return self.refusal
        self._handed_over = True
        if self._sealed is not None:
            return replace(self._sealed, draft=self._draft)
        return self._seal(b"".join(self._parts))

    def discard(self) -> None:
        self._parts = []
        if self._draft is not None and not self._handed_over:
            self._draft.discard()
            self._draft = None


class Handler:
    """The listener's policy, in aiosmtpd's handler hooks. `on_stored` is told of each
    entry once it is durable, with the content it holds in memory (none if spilled)."""

    def __init__(self, spool: Spool, writer: SpoolWriter, config: Config, admission: Admission,
                 on_stored: Callable[[Entry, tuple[bytes, ...]], None], rules: Rules,
                 metrics: Recorder, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.writer = writer
        self.config = config
        self.admission = admission
        self.on_stored = on_stored
        self.rules = rules
        self.metrics = metrics
        self.clock = clock

    def __dir__(self) -> list[str]:
        """For aiosmtpd's constructor, which looks for hooks and AUTH methods by listing
        and reading every attribute of the handler at each connection: those only."""
        return _HOOK_NAMES

    @property
    def hostname(self) -> str:
        """The relay's name (addresses.hostname): greeting, Received: and Message-IDs."""
        return self.rules.hostname

    # --- the session (relay.smtp_server) asks -------------------------------------------

    def admit(self, peer: Any) -> str | None:
        refused = self.admission.admit(peer)
        if refused is None:
            return None
        reason, reply = refused
        self.metrics.refused(reason)
        log_event(logging.INFO, None, event="refused", client=peer, reply=reply,
                  status="refused")
        return reply

    def release(self) -> None:
        self.admission.release()

    def extensions(self) -> list[str]:
        """EHLO's keywords besides aiosmtpd's: the session answers pipelined commands in
        order, every reply carries an RFC 3463 code, and mail may be sent later (RFC 4865)."""
        return ["PIPELINING", "ENHANCEDSTATUSCODES",
                schedule.futurerelease_keyword(self.config.delivery.max_schedule, self.clock())]

    def replied(self, reply: str) -> None:
        """Every error reply the session sends, for the refusal counts."""
        reason = refusal_reason(reply)
        if reason is not None:
            self.metrics.refused(reason)

    # --- aiosmtpd's hooks -------------------------------------------------------------------

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: RelayEnvelope,
                          address: str, mail_options: list[str]) -> str:
        sender = "" if address == NULL_PATH else address
        refusal = addresses.check_sender(self.rules, sender, envelope.smtp_utf8)
        if refusal is not None:
            return refusal
        unrouted = routing.refusal(self.config.upstreams, self._final_sender(sender))
        if unrouted is not None:
            return str(unrouted)
        try:
            envelope.send_at = schedule.hold_send_at(
                envelope.holdfor, envelope.holduntil, self.clock(),
                self.config.delivery.max_schedule)
        except ScheduleRefused as exc:
            return exc.reply
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
        if len(envelope.rcpt_tos) >= self.config.listen.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        refusal = addresses.check_recipient(self.rules, address, envelope.smtp_utf8)
        if refusal is not None:
            return refusal
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
        rules, max_schedule = self.rules, self.config.delivery.max_schedule
        sender = "" if envelope.mail_from == NULL_PATH else (envelope.mail_from or "")
        recipients = tuple(envelope.rcpt_tos)

        def seal(content: bytes) -> NewEntry | str:
            head = split_header(content)[0]
            try:
                header_send_at, stripped = schedule.message_send_at(content, now, max_schedule,
                                                                    head)
            except ScheduleRefused as exc:
                return exc.reply
            if stripped is not content:
                content, head = stripped, split_header(stripped)[0]
            applied = addresses.apply(rules, sender, recipients, content, head)
            if isinstance(applied, str):
                return applied
            added = [self._received_header(session, envelope.smtp_utf8, recipients,
                                           entry_id, now)]
            message_id = field_value(head, "Message-ID")
            if message_id is None:
                # As Postfix's cleanup does: every attempt then carries the same
                # Message-ID, so a duplicate delivery can be recognised downstream.
                message_id = f"<{entry_id}@{rules.hostname}>"
                added.append(f"Message-ID: {message_id}\r\n".encode())
            # A MAIL parameter (RFC 4865) wins over the header.
            send_at = envelope.send_at if envelope.send_at is not None else header_send_at
            return NewEntry(entry_id, applied.sender, applied.recipients,
                            (*added, *applied.parts), now, envelope.smtp_utf8,
                            send_at=send_at, message_id=message_id,
                            original_sender=applied.original_sender,
                            original_recipients=applied.original_recipients)
        return Message(self.spool, seal)

    async def end_message(self, session: Session, envelope: RelayEnvelope,
                          sink: Message) -> str:
        started = time.monotonic()
        if sink.error is not None:
            return NO_ROOM if isinstance(sink.error, SpoolFull) else WRITE_ERROR
        new = sink.new_entry()
        if isinstance(new, str):
            return new
        if new.draft is not None:
            try:
                self.spool.check_room(0)  # the last of a large message came since the last look
            except SpoolError as exc:
                new.draft.discard()
                return NO_ROOM if isinstance(exc, SpoolFull) else WRITE_ERROR
        # The store and its hand-over to delivery go on if the session ends meanwhile
        # (the client hangs up): the entry is durable, so it must be scheduled too.
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[tuple[str, Callable[[], None] | None]] = loop.create_future()
        client = _client_name(session)

        def stored(result: Entry | Exception) -> None:
            try:
                reply, hand_over = self._stored_reply(new, result, client, started)
            except Exception as exc:  # noqa: BLE001 - the session answers it (handle_exception)
                if not outcome.cancelled():
                    outcome.set_exception(exc)
                return
            if outcome.cancelled():
                if hand_over is not None:
                    loop.call_soon(hand_over)  # a step of its own, out of the writer's batch
            else:
                outcome.set_result((reply, hand_over))

        try:
            self.writer.store_then(new, stored)
        except WriterStopped:
            return WRITER_STOPPED
        try:
            reply, hand_over = await outcome
        except asyncio.CancelledError:
            # Ended after the store did but before hearing of it: hand over all the same.
            if outcome.done() and not outcome.cancelled() and outcome.exception() is None:
                _, hand_over = outcome.result()
                if hand_over is not None:
                    loop.call_soon(hand_over)  # as below: never raised into the cancellation
            raise
        if hand_over is not None:
            # Logged and handed to delivery in the loop's next step: this one writes the
            # 250, so the client waits for neither (nor for the delivery they start).
            loop.call_soon(hand_over)
        return reply

    def _stored_reply(self, new: NewEntry, result: Entry | Exception, client: str,
                      started: float) -> tuple[str, Callable[[], None] | None]:
        """The reply to the final dot once the store is done, and what hands the entry
        over to delivery (None if it was not stored). Raises what the store raised that
        is not the spool's (a bug's), for the session to answer."""
        if isinstance(result, WriterStopped):
            return WRITER_STOPPED, None
        if isinstance(result, SpoolFull):
            return NO_ROOM, None
        if isinstance(result, SpoolError):
            log_event(logging.ERROR, new.id, status="refused", reason=str(result))
            return WRITE_ERROR, None
        if isinstance(result, Exception):
            raise result
        fault_point("after-rename-before-250")
        self.metrics.accepted(time.monotonic() - started)
        hand_over = functools.partial(self._stored, result, new.parts, client, new.message_id)
        return f"250 2.0.0 Ok: queued as {result.id}", hand_over

    def _stored(self, entry: Entry, parts: tuple[bytes, ...], client: str,
                message_id: str | None) -> None:
        rewritten: dict[str, str] = {}
        if entry.original_sender is not None:
            rewritten["orig_from"] = f"<{entry.original_sender}>"
        if entry.original_recipients is not None:
            rewritten["orig_to"] = ",".join(f"<{a}>" for a in entry.original_recipients)
        log_event(logging.INFO, entry.id, client=client,
                  **{"from": entry.sender, "message-id": message_id}, **rewritten,
                  size=entry.size, nrcpt=len(entry.recipients), status="queued")
        self.on_stored(entry, parts)

    def _final_sender(self, sender: str) -> str:
        """The envelope sender the upstream will see, once the rules have applied."""
        qualified = self.rules.qualify(sender)
        if self.rules.default_sender is not None and self.rules.outside(qualified):
            return self.rules.default_sender
        return qualified

    def _received_header(self, session: Session, smtputf8: bool, recipients: tuple[str, ...],
                         entry_id: str, now: float) -> bytes:
        """RFC 5321 4.4 trace header. Only sanitised text goes in: a client's HELO can carry
        CR or LF, which must never become a header of its own, or 8-bit text, which must
        not make a 7-bit message 8-bit."""
        # Any name a client gives itself goes in (Postfix accepts them all, Windows hosts
        # send underscores), but as ASCII: no 8-bit text in a header of a 7-bit message.
        helo = header_safe(session.host_name or "unknown", ascii_only=True)[:MAX_TRACE_WORD]
        protocol = "UTF8SMTP" if smtputf8 else ("ESMTP" if session.extended_smtp else "SMTP")
        stamp = _date(int(now))
        recipient = (f"\r\n\tfor <{header_safe(recipients[0])[:MAX_TRACE_WORD]}>"
                     if len(recipients) == 1 else "")
        header = (f"Received: from {helo} ({_client_name(session)})\r\n"
                  f"\tby {self.hostname} (relay) with {protocol} id {entry_id}{recipient};\r\n"
                  f"\t{stamp}\r\n")
        return header.encode("utf-8")


_HOOK_NAMES = [name for name in dir(Handler) if name.startswith(("handle_", "auth_"))]


def refusal_reason(reply: str) -> Refusal | None:
    """Why an error reply refused mail, for relay_messages_refused_total; None for the
    errors that refuse nothing by themselves (a syntax error the client can correct)."""
    code, enhanced = reply[:3], reply[4:9]
    if code in ("553", "550"):
        return Refusal.ADDRESS
    if code == "552":
        return Refusal.SIZE
    if code == "452" and enhanced == "4.3.1":
        return Refusal.DISK
    if code == "451":
        return Refusal.ERROR
    if code == "421":
        return Refusal.TIMEOUT if enhanced == "4.4.2" else Refusal.PROTOCOL
    if code == "502" and reply.endswith("goodbye."):
        return Refusal.PROTOCOL
    return None


class ServerFactory:
    """Makes one session per connection from the current config, so a reload's new limits
    and rules apply to every connection made after it (sessions in progress keep theirs)."""

    def __init__(self, spool: Spool, writer: SpoolWriter, config: Config,
                 on_stored: Callable[[Entry, tuple[bytes, ...]], None], rules: Rules,
                 metrics: Recorder, clock: Callable[[], float] = time.time) -> None:
        self.admission = Admission(config.listen.allow, config.listen.max_connections)
        self.handler = Handler(spool, writer, config, self.admission, on_stored, rules, metrics,
                               clock)

    def reconfigure(self, config: Config, rules: Rules) -> None:
        self.handler.config = config
        self.handler.rules = rules
        self.admission.allow = config.listen.allow
        self.admission.max_connections = config.listen.max_connections

    def __call__(self) -> RelaySMTP:
        return RelaySMTP(self.handler, self.handler.config.listen, self.handler.hostname)


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 date of a second: every message received in the same second shares it."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def _client_name(session: Session) -> str:
    peer = session.peer
    return f"[{peer[0]}]" if isinstance(peer, tuple) and peer else "unknown"

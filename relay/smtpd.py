"""The server side of SMTP on one client connection: commands, replies, limits, DATA.

Why not aiosmtpd's protocol: every connection there costs about 180 us of introspection
before the greeting, every command a coroutine round trip and its own send, every MAIL
and RCPT a new class from its address parser; with one message per connection, as web
applications send, that was most of the relay's CPU (docs/BENCHMARKS.md). This is an
asyncio.BufferedProtocol: input is parsed as it arrives, replies to the commands of one
read go out in one write (RFC 2920 lets a server buffer them), and only DATA's spooling
awaits.

It owns the protocol, not the policy: `handler` decides about clients, senders,
recipients and messages (relay.listener), and a refusal it returns is sent as it is.
Replies follow RFC 5321 and RFC 3463 in Postfix's words. No STARTTLS and no AUTH are
offered: the listener serves local clients on trusted networks only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from .data import DataReader

logger = logging.getLogger("relay.smtpd")

# RFC 5321 4.5.3.1.4: 512 octets per command line, CRLF included; MAIL may carry 26 more
# for SIZE= (RFC 1870) and 10 more for SMTPUTF8 (RFC 6531).
COMMAND_LINE_LIMIT = 512
MAIL_LINE_LIMIT = COMMAND_LINE_LIMIT + 26 + 10
DATA_LINE_LIMIT = 1000  # RFC 5321 4.5.3.1.6, CRLF included
UNRECOGNIZED_LIMIT = 5  # then the client is not speaking SMTP: goodbye
# Commands that carry no mail are limited per session: a NOOP just before each timeout
# would otherwise hold a connection forever (slowloris). Mail-carrying commands are not:
# one connection may submit any number of messages.
CALL_LIMITS = {"NOOP": 20, "VRFY": 20, "EXPN": 20, "HELP": 20, "EHLO": 20, "HELO": 20}
# Pipelined input held while a message is being spooled; beyond it, reading pauses.
MAX_BUFFERED = 64 * 1024
# Each connection reads into a buffer of its own (asyncio.BufferedProtocol). A plain
# Protocol is handed a new bytes object per read, for which asyncio asks for 256 KiB:
# until glibc's malloc has raised its mmap threshold past that, each read maps, shrinks
# and unmaps it (three system calls, and the unmap flushes the TLB of each CPU running
# one of the process's threads), and otherwise it is still a large allocation per read.
RECEIVE_BUFFER = 64 * 1024


@dataclass
class Session:
    """What the client told us about itself; lives as long as the connection."""

    peer: Any
    host_name: str | None = None
    extended: bool = False  # greeted with EHLO


@dataclass
class Transaction:
    """One MAIL ... DATA; `sender` is "" for the null reverse-path."""

    sender: str
    smtputf8: bool
    declared_size: int
    recipients: list[str] = field(default_factory=list)


class Handler(Protocol):
    """The policy the protocol asks. Each returns a refusal to send, or None to accept."""

    def connect(self, peer: Any) -> str | None: ...

    def disconnect(self) -> None: ...

    def mail(self, session: Session, transaction: Transaction) -> str | None: ...

    def rcpt(self, session: Session, transaction: Transaction, address: str) -> str | None: ...

    async def data(self, session: Session, transaction: Transaction, content: bytes) -> str:
        """Store the message; the reply to the final dot."""


class SMTPServer(asyncio.BufferedProtocol):
    """One client connection. `size_limit` is the largest message accepted (0: none)."""

    def __init__(self, handler: Handler, hostname: str, size_limit: int,
                 timeout: float) -> None:
        self._handler = handler
        self._hostname = hostname
        self._size_limit = size_limit
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._admitted = False
        self._session = Session(peer=None)
        self._transaction: Transaction | None = None
        self._buffer = bytearray()
        self._received = memoryview(bytearray(RECEIVE_BUFFER))
        self._replies: list[bytes] = []
        self._data: DataReader | None = None  # set between 354 and the final dot
        self._storing: asyncio.Task[None] | None = None  # the handler spooling a message
        self._skipping_long_line = False
        self._reading_paused = False
        self._writing_paused = False
        self._unrecognized = 0
        self._calls: dict[str, int] = {}
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._session.peer = peer
        refusal = self._handler.connect(peer)
        if refusal is not None:
            transport.write(refusal.encode() + b"\r\n")
            transport.close()
            return
        self._admitted = True
        self._touch()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._deadline, self._check_idle)
        transport.write(f"220 {self._hostname} ESMTP\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        self._data = None
        self._buffer.clear()
        if self._admitted:
            self._admitted = False
            self._handler.disconnect()
        # A message being spooled is finished all the same: it is durable and scheduled,
        # and the client, which never heard 250, sends it again (RFC 5321 6.1 allows the
        # duplicate).

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        # A copy of what was read: the buffer is reused, and DATA keeps its blocks.
        self._take(self._received[:nbytes].tobytes())

    def _take(self, data: bytes) -> None:
        if self._data is not None and not self._buffer:
            # The body as read: no second copy into the command buffer.
            end = self._data.feed(data)
            if end is None:
                return
            self._buffer += data[end:]
            self._end_of_data()
        else:
            self._buffer += data
        self._process()

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its commands until it does.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        self._process()

    def eof_received(self) -> bool:
        return False  # a half-closed client has gone: close our side too

    # --- input --------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete command (or the DATA) in the buffer, in order, then send
        their replies in one write. Stops while a message is being spooled."""
        buffer = self._buffer
        position = 0
        while self._transport is not None and self._storing is None \
                and not self._writing_paused:
            if self._data is not None:
                end = self._data.feed(bytes(buffer[position:]))
                if end is None:
                    position = len(buffer)
                    break
                position += end
                self._end_of_data()
                continue
            newline = buffer.find(b"\n", position)
            if newline < 0:
                if len(buffer) - position > DATA_LINE_LIMIT:
                    # No end in sight: drop it now, answer when the line ends.
                    position = len(buffer)
                    self._skipping_long_line = True
                break
            line = bytes(buffer[position:newline + 1])
            position = newline + 1
            if self._skipping_long_line:
                self._skipping_long_line = False
                self._reply("500 5.5.2 Error: command line too long")
                continue
            try:
                self._command(line.rstrip(b"\r\n"))
            except Exception as exc:  # a bug of ours must not reach the client as text
                logger.error("SMTP session error: %s: %s", type(exc).__name__, exc,
                             exc_info=exc)
                self._reply("451 4.3.0 Error: internal error, try again later")
        del buffer[:position]
        self._flush()
        self._update_reading()

    def _update_reading(self) -> None:
        """Backpressure: no more input while the client's pipelined commands pile up
        behind a message being spooled, or while it is not reading our replies."""
        if self._transport is None:
            return
        hold = self._writing_paused or (self._storing is not None
                                        and len(self._buffer) > MAX_BUFFERED)
        if hold and not self._reading_paused:
            self._transport.pause_reading()
        elif not hold and self._reading_paused:
            self._transport.resume_reading()
        self._reading_paused = hold

    # --- output -------------------------------------------------------------------------

    def _reply(self, text: str) -> None:
        self._replies.append(text.encode("utf-8", "replace") + b"\r\n")

    def _flush(self) -> None:
        if self._replies and self._transport is not None:
            self._transport.write(b"".join(self._replies))
        self._replies.clear()

    def _close(self) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.close()

    # --- idle timeout -------------------------------------------------------------------

    def _touch(self) -> None:
        """A command was recognised: the idle timer starts again (RFC 5321 4.5.3.2.7).
        The timer itself is moved only when it fires, not at every command."""
        self._deadline = asyncio.get_running_loop().time() + self._timeout

    def _check_idle(self) -> None:
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline or self._storing is not None:
            self._timer = loop.call_at(max(self._deadline, loop.time() + 0.1), self._check_idle)
            return
        self._reply("421 4.4.2 Error: timeout exceeded")
        self._close()

    # --- commands -----------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        verb_bytes, _, arg_bytes = line.partition(b" ")
        verb = verb_bytes.upper().decode("ascii", "replace")
        method = self._COMMANDS.get(verb)
        if method is None:
            self._unrecognized_command(f'500 5.5.2 Error: command "{verb}" not recognized'
                                       if verb.isalpha() else "500 5.5.2 Error: bad syntax")
            return
        try:
            arg = arg_bytes.strip().decode("utf-8")
        except UnicodeDecodeError:
            self._unrecognized_command("500 5.5.2 Error: bad syntax (not UTF-8)")
            return
        limit = MAIL_LINE_LIMIT if verb == "MAIL" and self._session.extended else COMMAND_LINE_LIMIT
        if len(line) + 2 > limit:
            self._reply("500 5.5.2 Error: command line too long")
            return
        if verb in CALL_LIMITS:
            calls = self._calls.get(verb, 0) + 1
            self._calls[verb] = calls
            if calls > CALL_LIMITS[verb]:
                self._reply(f"421 4.7.0 {verb} sent too many times")
                self._close()
                return
        self._touch()
        method(self, arg)

    def _unrecognized_command(self, reply: str) -> None:
        """Garbage, or another protocol (HTTP, TLS) on this port: a few tries, then goodbye."""
        self._unrecognized += 1
        if self._unrecognized >= UNRECOGNIZED_LIMIT:
            self._reply("502 5.5.1 Too many unrecognized commands, goodbye.")
            self._close()
        else:
            self._reply(reply)

    def _helo(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: HELO hostname")
            return
        self._session.host_name, self._session.extended = arg, False
        self._transaction = None
        self._reply(f"250 {self._hostname}")

    def _ehlo(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self._session.host_name, self._session.extended = arg, True
        self._transaction = None
        lines = [self._hostname]
        if self._size_limit:
            lines.append(f"SIZE {self._size_limit}")
        lines += ["8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES", "HELP"]
        for line in lines[:-1]:
            self._reply(f"250-{line}")
        self._reply(f"250 {lines[-1]}")

    def _mail(self, arg: str) -> None:
        if self._needs_helo():
            return
        syntax = "501 5.5.4 Syntax: MAIL FROM:<address>" + (
            " [SP <mail-parameters>]" if self._session.extended else "")
        parsed = self._path_argument("FROM:", arg, syntax)
        if parsed is None:
            return
        sender, params = parsed
        if params and not self._session.extended:
            self._reply(syntax)
            return
        if self._transaction is not None:
            self._reply("503 5.5.1 Error: nested MAIL command")
            return
        options = _parse_params(params)
        if options is None:
            self._reply(syntax)
            return
        body = options.pop("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            self._reply("501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = options.pop("SMTPUTF8", None)
        if smtputf8 not in (None, ""):
            self._reply("501 5.5.4 Error: SMTPUTF8 takes no arguments")
            return
        size = options.pop("SIZE", "0")
        if not size.isdigit():
            self._reply(syntax)
            return
        if self._size_limit and int(size) > self._size_limit:
            self._reply("552 5.3.4 Error: message size exceeds fixed maximum message size")
            return
        if options:
            self._reply("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        transaction = Transaction(sender=sender, smtputf8=smtputf8 is not None,
                                  declared_size=int(size))
        refusal = self._handler.mail(self._session, transaction)
        if refusal is not None:
            self._reply(refusal)
            return
        self._transaction = transaction
        self._reply("250 2.1.0 Ok")

    def _rcpt(self, arg: str) -> None:
        if self._needs_helo():
            return
        transaction = self._transaction
        if transaction is None:
            self._reply("503 5.5.1 Error: need MAIL command")
            return
        syntax = "501 5.5.4 Syntax: RCPT TO:<address>"
        parsed = self._path_argument("TO:", arg, syntax)
        if parsed is None:
            return
        address, params = parsed
        if not address:
            self._reply(syntax)
            return
        if params:
            self._reply("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        refusal = self._handler.rcpt(self._session, transaction, address)
        if refusal is not None:
            self._reply(refusal)
            return
        transaction.recipients.append(address)
        self._reply("250 2.1.5 Ok")

    def _data_command(self, arg: str) -> None:
        if self._needs_helo():
            return
        if self._transaction is None or not self._transaction.recipients:
            self._reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: DATA")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._data = DataReader(self._size_limit, DATA_LINE_LIMIT)

    def _end_of_data(self) -> None:
        assert self._data is not None and self._transaction is not None
        content, refusal = self._data.result()
        self._data = None
        transaction, self._transaction = self._transaction, None
        if refusal is not None:
            self._reply(refusal)
            return
        self._flush()
        self._storing = asyncio.create_task(self._store(transaction, content))

    async def _store(self, transaction: Transaction, content: bytes) -> None:
        try:
            reply = await self._handler.data(self._session, transaction, content)
        except Exception as exc:
            logger.error("SMTP session error: %s: %s", type(exc).__name__, exc, exc_info=exc)
            reply = "451 4.3.0 Error: internal error, try again later"
        self._storing = None
        if self._transport is None:
            return
        self._touch()
        self._reply(reply)
        self._process()  # the commands the client pipelined meanwhile, and the flush

    def _rset(self, arg: str) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: RSET")
            return
        self._transaction = None
        self._reply("250 2.0.0 Ok")

    def _noop(self, arg: str) -> None:
        self._reply("250 2.0.0 Ok")

    def _quit(self, arg: str) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: QUIT")
            return
        self._reply("221 2.0.0 Bye")
        self._close()

    def _vrfy(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: VRFY <address>")
            return
        # RFC 5321 3.5.3: 252 when the server will not say whether a mailbox exists.
        self._reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _expn(self, arg: str) -> None:
        self._reply("502 5.5.1 Error: EXPN not implemented")

    def _help(self, arg: str) -> None:
        self._reply("214 2.0.0 Commands: " + " ".join(sorted(self._ADVERTISED)))

    def _starttls(self, arg: str) -> None:
        self._reply("502 5.5.1 Error: command not implemented")

    def _auth(self, arg: str) -> None:
        self._reply("503 5.5.1 Error: authentication not enabled")

    def _path_argument(self, keyword: str, arg: str, syntax: str) -> tuple[str, str] | None:
        """(address, parameters) after `keyword` (FROM: or TO:); None once refused."""
        rest = _strip_keyword(keyword, arg)
        if not rest:
            self._reply(syntax)
            return None
        parsed = parse_path(rest)
        if parsed is None:
            self._reply("553 5.1.3 Error: malformed address")
        return parsed

    def _needs_helo(self) -> bool:
        if self._session.host_name is None:
            self._reply("503 5.5.1 Error: send HELO first")
            return True
        return False

    _COMMANDS = {
        "HELO": _helo, "EHLO": _ehlo, "MAIL": _mail, "RCPT": _rcpt, "DATA": _data_command,
        "RSET": _rset, "NOOP": _noop, "QUIT": _quit, "VRFY": _vrfy, "EXPN": _expn,
        "HELP": _help, "STARTTLS": _starttls, "AUTH": _auth,
    }
    _ADVERTISED = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY")


def parse_path(text: str) -> tuple[str, str] | None:
    """(mailbox, parameters) from a MAIL FROM or RCPT TO argument; None if malformed.

    RFC 5321 4.1.2: `<` [source route `:`] mailbox `>`, or `<>`; a quoted local part may
    hold `>` or spaces. A bare mailbox without brackets is taken as far as the first
    space, as Postfix does. The mailbox's own syntax is the handler's to check.
    """
    text = text.lstrip()
    if not text.startswith("<"):
        mailbox, _, params = text.partition(" ")
        return (mailbox, params.strip()) if mailbox else None
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = quoted
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            mailbox, params = text[1:index], text[index + 1:]
            break
        elif char == "<" and not quoted:
            return None
    else:
        return None
    if params and not params.startswith(" "):
        return None
    if mailbox.startswith("@"):  # a source route, which RFC 5321 4.1.2 says to ignore
        _, colon, mailbox = mailbox.partition(":")
        if not colon:
            return None
    return mailbox, params.strip()


def _strip_keyword(keyword: str, arg: str) -> str | None:
    if arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):]


def _parse_params(params: str) -> dict[str, str] | None:
    """ESMTP parameters (RFC 5321 4.1.2: keyword[=value]), names upper-cased; None if
    malformed. A parameter without a value maps to ""."""
    options: dict[str, str] = {}
    for param in params.split():
        name, equals, value = param.partition("=")
        if not name.isalnum() or not name.isascii() or (equals and not value):
            return None
        options[name.upper()] = value.upper() if name.upper() == "BODY" else value
    return options

"""The listener's SMTP sessions: aiosmtpd's `SMTP`, with the few overrides the relay needs.

aiosmtpd speaks the protocol: it reads and parses every command, checks sequence and
syntax, and calls the relay's policy (relay.listener) through its handler hooks. This
subclass changes only what the contract (docs/CONTRACT.md) or a profile requires. Each
override is small, was written against aiosmtpd 1.4.6, and is pinned by
tests/test_smtp_server.py, which fails if aiosmtpd changes what it relies on:

- `push`: replies get RFC 3463 enhanced status codes where aiosmtpd's have none, and
  never echo more than a bounded part of what the client sent (RFC 5321 4.5.3.1.5). The
  replies to the commands of one read go out in one write (RFC 2920 lets a server buffer
  them; aiosmtpd writes and drains each), held while aiosmtpd's reader still has a whole
  line. A reply that ends the session ends it at once: nothing the client sent after it
  in the same read is acted on.
- The session is also an asyncio BufferedProtocol, reading into one buffer of its own
  rather than a new 256 KiB one per read, on asyncio's loop (uvloop does without it;
  docs/BENCHMARKS.md has the profile).
- Limits per session, as Postfix's smtpd_junk_command_limit and smtpd_hard_error_limit:
  commands that carry no mail (NOOP, RSET, VRFY, EXPN, HELP, EHLO, HELO) and error
  replies are counted, both counts start again with each message queued, and past the
  limit the session ends with 421.
- The idle timeout aborts the connection instead of closing it, so that a client that
  does not read its replies cannot keep its slot; it waits while a message is being
  stored, and it is one timer moved when it fires rather than a new timer per command.
- DATA is read in blocks and written to the spool as it arrives (relay.data has the
  rules), not line by line into memory.
- Admission (allowed networks, connection limit) before aiosmtpd's session starts; MAIL
  parameters aiosmtpd would turn into a traceback are refused with 501; parsed paths are
  remembered, as applications send from and to the same few addresses; and the costs of
  aiosmtpd's constructor (dir() of the session, a hook's signature) are avoided.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, AnyStr, Protocol, TypeVar, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from .config import ListenConfig
from .data import END_OF_DATA, DataReader

logger = logging.getLogger("relay.smtp")

# RFC 5321 4.5.3.1.4: 512 octets for a command line; MAIL may carry 26 more for SIZE=
# (RFC 1870) and 10 more for SMTPUTF8 (RFC 6531). aiosmtpd counts without the CRLF.
COMMAND_LINE_LIMIT = 512
MAIL_LINE_LIMIT = COMMAND_LINE_LIMIT + 26 + 10
REPLY_LINE_LIMIT = 510  # RFC 5321 4.5.3.1.5: 512 octets with the CRLF
JUNK_LIMIT = 20  # commands without mail per message
ERROR_LIMIT = 20  # error replies per message
OVERSHOOT_LIMIT = 1000  # recipients past max_recipients (452) before each counts as an error
RECEIVE_BUFFER = 64 * 1024  # per session, what one read can take
HELD_REPLIES = 16 * 1024  # replies to pipelined commands written at once, up to this much
PATH_CACHE = 4096
STORING_RECHECK = 0.1  # seconds: how often a timeout that fell due while storing looks again

# aiosmtpd's own replies, when they carry no enhanced status code: the code to add, by the
# reply code (RFC 3463). Greetings and the answers to HELO and EHLO carry none (RFC 2034).
_ENHANCED = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "250": "2.0.0", "252": "2.0.0",
    "421": "4.7.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0", "500": "5.5.2",
    "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
    "538": "5.7.11", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0",
    "555": "5.5.4",
}
# aiosmtpd replies that repeat what the client sent: replaced whole.
_ECHOING = (
    ('500 Error: command "', "500 5.5.2 Error: command not recognized"),
    ("502 Could not VRFY", "502 5.5.2 Error: cannot VRFY that"),
)
EHLO_LAST_LINE = "250 HELP"
_LISTED = ("smtp_", "auth_")
_METHOD_NAMES: dict[type, list[str]] = {}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_CLOSING = ("221", "421")
GOODBYE = "502 5.5.1 Too many unrecognized commands, goodbye."
TIMEOUT = "421 4.4.2 Error: timeout exceeded"
INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope, plus what the relay's policy learns during the transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.declared_size = 0  # MAIL's SIZE=, 0 when not given
        self.holdfor: str | None = None  # MAIL's HOLDFOR= and HOLDUNTIL= (RFC 4865)
        self.holduntil: str | None = None
        self.send_at: float | None = None  # what the policy made of them


class MessageSink(Protocol):
    """Where DATA's content goes as it is read (relay.listener.Message)."""

    def write(self, content: bytes) -> None: ...

    def discard(self) -> None: ...


Sink = TypeVar("Sink", bound=MessageSink)


class Policy(Protocol[Sink]):
    """What the session asks of the relay's policy beyond aiosmtpd's handler hooks; `Sink`
    is the type of what begin_message returns and end_message is given back."""

    def admit(self, peer: Any) -> str | None: ...

    def extensions(self) -> list[str]:
        """EHLO keywords besides aiosmtpd's (SIZE, 8BITMIME, SMTPUTF8, HELP)."""

    def replied(self, reply: str) -> None:
        """An error reply (4xx or 5xx) the session sent."""

    def release(self) -> None: ...

    def begin_message(self, session: Session, envelope: RelayEnvelope) -> Sink: ...

    async def end_message(self, session: Session, envelope: RelayEnvelope, sink: Sink) -> str: ...


class RelaySMTP(SMTP, asyncio.BufferedProtocol):
    """One client connection: aiosmtpd's protocol with the relay's overrides. It is also a
    BufferedProtocol, so that asyncio's transport reads into the session's own buffer: for
    a plain Protocol asyncio allocates 256 KiB per read, which glibc maps, shrinks and
    unmaps each time (three system calls and page faults per read). uvloop, which
    `relay serve` runs on where installed, reads into its own buffer and calls
    data_received for any asyncio.Protocol, as this one is: there the override is idle."""

    def __init__(self, handler: Policy[Any], config: ListenConfig, hostname: str) -> None:
        super().__init__(handler, data_size_limit=config.max_message_size or None,
                         enable_SMTPUTF8=True, decode_data=False, hostname=hostname,
                         ident="ESMTP", timeout=config.timeout,
                         loop=asyncio.get_running_loop())
        self.policy = handler
        self._deadline = 0.0  # of the idle timeout
        # aiosmtpd keeps these limits on the class, shared by every session, and raises
        # MAIL's at each EHLO: each session gets its own, fixed.
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LINE_LIMIT)
        self._admitted = False
        self._received: memoryview | None = None  # what the transport reads into
        self._held: list[bytes] = []  # replies not yet written (see push)
        self._plain_replies = False  # answering HELO or EHLO: no enhanced codes
        self._junk = 0
        self._errors = 0
        self._overshoot = 0
        self._storing = False
        self._ended = False  # a reply ended the session: nothing more is said

    # --- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = self.policy.admit(transport.get_extra_info("peername"))
        if refusal is not None:
            # A stream transport (uvloop's is not a subclass of asyncio's, so no isinstance).
            stream = cast(asyncio.Transport, transport)
            stream.write(refusal.encode() + b"\r\n")
            stream.close()
            return
        self._admitted = True
        self._received = memoryview(bytearray(RECEIVE_BUFFER))
        super().connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self._received is not None
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        assert self._received is not None
        # The reader copies it into its own buffer at once, so the view can be reused.
        self.data_received(self._received[:nbytes])  # type: ignore[arg-type]

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return  # refused at connect: aiosmtpd's session never started
        self._admitted = False
        self.policy.release()
        super().connection_lost(error)

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def eof_received(self) -> bool | None:
        """The client has sent all it will (a half-close, as `printf ... | nc` does):
        aiosmtpd cancels the session here, even while it stores a message the client then
        never hears of. Instead what was sent before is read and answered, and the session
        ends where the reading finds nothing more (handle_exception)."""
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError):
            self._end_session()  # the client's EOF, reached by the reading: nothing to answer
            return ""
        return await super().handle_exception(error)

    def __dir__(self) -> list[str]:
        """aiosmtpd's constructor finds a session's command and AUTH methods by listing and
        reading every attribute (dir, inspect.getmembers) at every connection. This class
        lists only those, once."""
        names = _METHOD_NAMES.get(type(self))
        if names is None:
            names = [name for name in super().__dir__() if name.startswith(_LISTED)]
            _METHOD_NAMES[type(self)] = names
        return names

    # --- replies --------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self._ended:
            return
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        if self._plain_replies:
            reply = text
            if text == EHLO_LAST_LINE:
                # The extensions aiosmtpd leaves to the server, said here rather than in
                # a handle_EHLO hook, whose signature aiosmtpd inspects at every connection.
                for extension in self.policy.extensions():
                    self._hold(f"250-{extension}\r\n".encode())
        else:
            reply = _with_enhanced_code(text)
        self._hold(reply.encode("utf-8", "replace") + b"\r\n")
        code = reply[:3]
        if code[:1] in ("4", "5"):
            self.policy.replied(reply)
        if code in _CLOSING or reply == GOODBYE:
            self._end_session()
            return
        if code[:1] in ("4", "5") and self._count_error(reply):
            self._hold(TOO_MANY_ERRORS.encode() + b"\r\n")
            self.policy.replied(TOO_MANY_ERRORS)
            self._end_session()
            return
        if not self._more_to_answer():
            self._flush()
            await self._writer.drain()

    def _more_to_answer(self) -> bool:
        """Whether this reply waits for the next ones: an EHLO reply is written whole, at
        its last line, and the replies to pipelined commands already read go out in one
        write (RFC 2920 lets a server buffer them) unless they pile up."""
        if not self._held or self._held[-1].startswith(b"354"):
            return False  # after 354 what the reader holds is content, not commands
        return self._held[-1].startswith(b"250-") or (
            b"\n" in self._reader._buffer  # type: ignore[attr-defined]
            and sum(map(len, self._held)) < HELD_REPLIES)

    def _hold(self, line: bytes) -> None:
        self._held.append(line)

    def _flush(self) -> None:
        if self._held and self.transport is not None:
            self.transport.write(b"".join(self._held))  # type: ignore[attr-defined]
        self._held.clear()

    def _end_session(self) -> None:
        """After a reply that ends the session: send what is held, close, and act on
        nothing more. aiosmtpd goes on to read the next command, and a command the client
        sent in the same write is already buffered, so the session's reader is replaced
        by an empty one: the read waits, and the cancellation ends the session there."""
        self._ended = True
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self._reader = asyncio.StreamReader(loop=self.loop)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _count_error(self, reply: str) -> bool:
        """Count an error reply; whether the session is past its limit."""
        if reply.startswith("452 4.5.3"):
            self._overshoot += 1
            if self._overshoot <= OVERSHOOT_LIMIT:
                return False
        self._errors += 1
        return self._errors > ERROR_LIMIT

    def message_queued(self) -> None:
        """A message was queued: the session's counts start again (as Postfix's do)."""
        self._junk = self._errors = self._overshoot = 0

    # --- the idle timeout -----------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd replaces its timer at every command; here the deadline moves and the
        one timer is moved only when it fires early (a timer costs more than a command)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline or self._storing:
            # Not yet, or the reply waits for the disk rather than for the client.
            when = max(self._deadline, self.loop.time() + STORING_RECHECK)
            self._timeout_handle = self.loop.call_at(when, self._timeout_cb)
            return
        self._flush()
        if self.transport is not None:
            self.policy.replied(TIMEOUT)
            self.transport.write(TIMEOUT.encode() + b"\r\n")  # type: ignore[attr-defined]
            self.transport.abort()  # type: ignore[attr-defined]

    # --- commands -------------------------------------------------------------------------

    async def _junk_command(self) -> bool:
        """Count a command that carries no mail; True if the session has just ended."""
        self._junk += 1
        if self._junk <= JUNK_LIMIT:
            return False
        await self.push("421 4.7.0 Error: too many commands without mail")
        return True

    async def smtp_HELO(self, hostname: str) -> None:
        if await self._junk_command():
            return
        self._plain_replies = bool(hostname)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._junk_command():
            return
        self._plain_replies = bool(hostname)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False
            self.command_size_limits["MAIL"] = MAIL_LINE_LIMIT

    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_NOOP(arg)

    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_RSET(arg)

    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_EXPN(arg)

    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_command():
            # RFC 5321 4.1.1.8: 214 (aiosmtpd answers 250).
            await self.push("214 2.0.0 Commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT "
                            "RSET VRFY")

    async def smtp_MAIL(self, arg: str | None) -> None:
        path = self._strip_command_keyword("FROM:", arg or "")
        _, parameters = self._getaddr(path) if path else (None, None)
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope) and self.session is not None
        kept, hold = [], {}
        for parameter in (parameters or "").split():
            name, _, value = parameter.partition("=")
            if name.upper() in ("HOLDFOR", "HOLDUNTIL") and self.session.extended_smtp:
                hold[name.upper()] = value  # a bare keyword: "", refused as malformed
            else:
                kept.append(parameter)
        # aiosmtpd checks SIZE= with str.isdigit(), which takes '²', and int() then raises;
        # it keeps the last of several, so every one is checked.
        sizes = _SIZE_PARAMETER.findall(" ".join(kept))
        if not all(size.isascii() and size.isdigit() for size in sizes):
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> SIZE=<number>")
            return
        if not envelope.mail_from:
            envelope.declared_size = int(sizes[-1]) if sizes else 0
            envelope.holdfor, envelope.holduntil = hold.get("HOLDFOR"), hold.get("HOLDUNTIL")
        if hold and path is not None and parameters is not None:
            # RFC 4865's parameters are the policy's: aiosmtpd refuses any it does not know.
            arg = f"FROM:{path[:len(path) - len(parameters)].rstrip()} {' '.join(kept)}"
        await super().smtp_MAIL(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        cached = _PATHS.get(arg)
        if cached is None:
            cached = super()._getaddr(arg)
            if len(_PATHS) >= PATH_CACHE:
                _PATHS.clear()
            _PATHS[arg] = cached
        return cached

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read in blocks, none of which goes past the end of data: what follows it
        is the client's next command. A failure of ours while the content comes in (the
        policy's or the disk's) does not stop the reading: the client's message is read to
        its end whatever happens, then refused, so that none of it is taken as commands."""
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope) and self.session is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        sink: MessageSink | None = self.policy.begin_message(self.session, envelope)
        reply = INTERNAL_ERROR
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            reader = DataReader(self.data_size_limit, self.line_length_limit)
            async for content in self._data_blocks(reader):
                if content and sink is not None:
                    sink = self._write(sink, content)
            if reader.refusal is not None:
                reply = reader.refusal
            elif sink is not None:
                self._storing = True
                try:
                    reply = await self.policy.end_message(self.session, envelope, sink)
                except Exception as exc:  # noqa: BLE001 - answered 451, never as text
                    reply = await self.handle_exception(exc)
                finally:
                    self._storing = False
        finally:
            if sink is not None and not reply.startswith("250"):
                sink.discard()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        if reply.startswith("250"):
            self.message_queued()
        await self.push(reply)

    def _write(self, sink: MessageSink, content: bytes) -> MessageSink | None:
        """Hand content to the sink; None once the sink has failed (the rest is read and
        dropped, and the message refused at its end)."""
        try:
            sink.write(content)
        except Exception as exc:
            logger.error("SMTP session error: %s: %s", type(exc).__name__, exc, exc_info=exc)
            sink.discard()
            return None
        return sink

    async def _data_blocks(self, reader: DataReader) -> AsyncIterator[bytes]:
        """The content of DATA, block by block, as DataReader makes of what the stream holds.

        A block is what the stream holds up to the first end of data, or all it holds but
        its last four octets (asyncio's readuntil says how much that is when it does not
        find it). An end of data can then never lie across two blocks, except where what
        was taken ends with the start of one (the CRLF that ended DATA, at first): from
        there the next octets are taken one at a time, until they settle it."""
        tail = b"\r\n"  # what was taken last: at first the CRLF of the DATA command
        end: int | None = None
        while end is None:
            if _ends_with_start_of_end(tail):
                block = await self._reader.readexactly(1)
            else:
                try:
                    block = await self._reader.readuntil(END_OF_DATA)
                except asyncio.LimitOverrunError as overrun:
                    block = await self._reader.readexactly(overrun.consumed)
            tail = (tail + block[-4:])[-4:]
            content, end = reader.feed(block)
            yield content

def _ends_with_start_of_end(tail: bytes) -> bool:
    """Whether `tail` ends with a proper beginning of END_OF_DATA ("\\r", "\\r\\n", ...)."""
    return any(tail.endswith(END_OF_DATA[:n]) for n in range(1, len(END_OF_DATA)))


_SIZE_PARAMETER = re.compile(r"(?i)(?:^|\s)SIZE=(\S*)")
_PATHS: dict[str, tuple[str | None, str | None]] = {}
_REPLIES: dict[str, str] = {}


def _with_enhanced_code(text: str) -> str:
    """The reply with an RFC 3463 code and bounded in length. Most replies are one of a
    few texts: their answers are kept."""
    known = _REPLIES.get(text)
    if known is None:
        known = _enhanced(text)
        if len(_REPLIES) >= PATH_CACHE:
            _REPLIES.clear()
        _REPLIES[text] = known
    return known


def _enhanced(text: str) -> str:
    for prefix, replacement in _ECHOING:
        if text.startswith(prefix):
            return replacement
    if not _HAS_ENHANCED.match(text):
        enhanced = _ENHANCED.get(text[:3])
        if enhanced is not None and text[3:4] in (" ", ""):
            text = f"{text[:3]} {enhanced}{text[3:]}" if len(text) > 3 else f"{text} {enhanced}"
    return text[:REPLY_LINE_LIMIT]

"""The upstream connection once aiosmtplib has set it up: commands out, replies in.

relay.smtp_client hands the transport over to a Link (`transport.set_protocol`) to send its
transactions pipelined (RFC 2920), which aiosmtplib cannot. A Link reads replies strictly
in order, bounded in size, and keeps their text printable (`printable`); it refuses to
send while a reply nobody asked for waits unread. Anything that leaves the session out
of step ends it, and every SessionError raised here names the stage of the command.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiosmtplib

from .errors import ReplyTimeout, SessionError
from .outcome import Reply, Stage
from .text import escape

# Bounds on what the upstream may send, as aiosmtplib's: a reply line, a whole reply
# (continuation lines included), and everything unread at once.
MAX_REPLY_LINE = 8192
MAX_REPLY = 4 * MAX_REPLY_LINE
MAX_UNREAD = 1024 * 1024
# Replies are read into one buffer the link keeps (asyncio.BufferedProtocol) rather than a
# new bytes object for every read.
RECEIVE_BUFFER = MAX_REPLY_LINE
QUIT_SECONDS = 5.0
# Characters of a reply kept (state record, attempt history, logs): a server may send 32 KiB.
MAX_REPLY_TEXT = 1000


class Link(asyncio.BufferedProtocol):
    """Commands sent pipelined or one at a time, replies read in order. Anything that
    leaves the session out of step (a timeout, a garbled or oversized reply, a reply
    nobody asked for, a 421) closes it, so it is never reused."""

    def __init__(self, smtp: aiosmtplib.SMTP, timeout: float) -> None:
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise SessionError(Reply(None, "connection failed: closed during the set-up"),
                               Stage.SESSION)
        self.extensions = frozenset(smtp.esmtp_extensions)
        self.timeout = timeout
        self._transport = cast(asyncio.Transport, transport)
        self._buffer = bytearray()
        self._received = memoryview(bytearray(RECEIVE_BUFFER))
        self._waiter: asyncio.Future[None] | None = None
        self._lost: str | None = None
        transport.set_protocol(self)

    @property
    def is_connected(self) -> bool:
        return self._lost is None and not self._transport.is_closing()

    @property
    def unread(self) -> bool:
        return bool(self._buffer)

    def send(self, data: bytes, stage: Stage) -> None:
        """Write commands; a reply waiting unread means replies and commands are out of
        step (the server answered something twice), so nothing more is sent."""
        if not self.is_connected:
            raise SessionError(Reply(None, f"connection failed: {self._lost or 'closed'}"),
                               stage)
        if self._buffer:
            raise self.out_of_step("a reply came that no command asked for", stage)
        self._transport.write(data)

    async def reply(self, stage: Stage, timeout: float | None = None) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._parse(stage)
            if reply is not None:
                if reply.code == 421:
                    self.abort("the upstream is closing the session (421)")
                return reply
            if self._lost is not None:
                raise SessionError(Reply(None, f"connection failed: {self._lost}"), stage)
            waiter = self._waiter = loop.create_future()
            # One timer per wait, cheaper than asyncio.timeout's cancellation machinery.
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                self.abort("no reply in time")
                raise ReplyTimeout(Reply(None, "timed out: no reply in time"), stage) from None
            finally:
                timer.cancel()
                self._waiter = None

    async def quit(self) -> None:
        if self.is_connected:
            try:
                self.send(b"QUIT\r\n", Stage.QUIT)
                await self.reply(Stage.QUIT, QUIT_SECONDS)
            except SessionError:
                pass
        self._transport.close()

    def abort(self, why: str) -> None:
        self._lost = self._lost or why
        self._transport.abort()

    def out_of_step(self, why: str, stage: Stage) -> SessionError:
        """End the session: its replies no longer match its commands."""
        self.abort("replies out of step with commands")
        return SessionError(Reply(None, f"protocol error: replies out of step with "
                                        f"commands ({why})"), stage)

    # --- asyncio.BufferedProtocol ---------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        self._buffer += self._received[:nbytes]
        if len(self._buffer) > MAX_UNREAD:
            self.abort("the upstream sent more than it was asked for")
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._lost or (printable(str(exc)) if exc else "closed by the upstream")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self, stage: Stage) -> Reply | None:
        """The first complete reply in the buffer, removed from it; None if there is none
        yet. A reply that breaks the grammar or the bounds closes the session."""
        buffer = self._buffer
        texts: list[bytes] = []
        offset = 0
        while True:
            end = buffer.find(b"\n", offset, offset + MAX_REPLY_LINE)
            if end < 0:
                if len(buffer) - offset >= MAX_REPLY_LINE:
                    raise self._garbled("reply line too long", stage)
                return None
            line = bytes(buffer[offset:end + 1])
            offset = end + 1
            code, separator = line[:3], line[3:4]
            if not code.isdigit() or separator not in (b" ", b"-", b"\r", b"\n"):
                shown = printable(line.decode("utf-8", "backslashreplace"))[:80]
                raise self._garbled(f"malformed reply line {shown}", stage)
            texts.append(line[4:].strip())
            if separator != b"-":
                del buffer[:offset]
                # Bytes that are not UTF-8 (a Latin-1 server's "bo\xeete pleine") are kept
                # as \xNN: printable, and the state record can always be written.
                text = b" ".join(t for t in texts if t).decode("utf-8", "backslashreplace")
                return Reply(int(code), printable(text))
            if offset > MAX_REPLY:
                raise self._garbled("reply too long", stage)

    def _garbled(self, why: str, stage: Stage) -> SessionError:
        self.abort(why)
        return SessionError(Reply(None, f"protocol error: {why}"), stage)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def printable(text: str) -> str:
    """Reply text as the relay keeps it: one line (a reply's lines and runs of white
    space joined by one space); bytes that were not UTF-8 (which aiosmtplib decodes to
    surrogate escapes) shown as \\xNN; other control characters escaped; at most
    MAX_REPLY_TEXT characters. Every byte of a shorter reply shows, and the result is
    always encodable, so a state record holding it can be written. A backslash is kept
    as it is: a reply that spells "\\xee" reads as one with that byte."""
    text = " ".join(text.split())
    if not text.isprintable():  # surrogates and control characters are not
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        text = escape(text)
    if len(text) > MAX_REPLY_TEXT:
        text = text[:MAX_REPLY_TEXT - 1] + "…"
    return text

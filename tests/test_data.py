"""DATA read in blocks (relay/data.py, relay/smtp_server.py) against aiosmtpd's own
line-by-line reading.

Two properties over random streams cut at random points: DataReader gives the content,
refusal and rest that the rules aiosmtpd follows give (a plain line-by-line model of its
smtp_DATA), and the relay's session, fed the same pieces, stores and answers what
aiosmtpd's own session does, run side by side in one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import ListenConfig
from relay.data import TOO_LONG, TOO_MUCH, DataReader
from relay.smtp_server import RelayEnvelope, RelaySMTP

LINE_LIMIT = 20  # small, so that short random streams pass it often (commands fit)
SIZE_LIMIT = 60


def line_by_line(stream: bytes, size_limit: int, line_limit: int
                 ) -> tuple[bytes, str | None, bytes]:
    """(content, refusal, rest) as aiosmtpd's smtp_DATA reads `stream`: lines end with CRLF
    only, a line ".\\r\\n" ends the data, a line whose text is over the limit fails before
    its octets are counted, the size counts every line, a line over the limit only with
    its CRLF fails after that, and a leading dot is dropped."""
    lines, size, position, refusal = [], 0, 0, None
    while True:
        end = stream.find(b"\r\n", position)
        assert end != -1, "the strategy always ends the data"
        line = stream[position:end + 2]
        position = end + 2
        if line == b".\r\n":
            break
        if refusal is not None:
            continue
        if len(line) - 2 > line_limit:
            refusal = TOO_LONG
            continue
        size += len(line)
        if size_limit and size > size_limit:
            refusal = TOO_MUCH
        elif len(line) > line_limit:
            refusal = TOO_LONG
        else:
            lines.append(line[1:] if line.startswith(b".") else line)
    rest = stream[position:]
    return (b"", refusal, rest) if refusal else (b"".join(lines), None, rest)


def read_in_pieces(pieces: list[bytes], size_limit: int, line_limit: int
                   ) -> tuple[bytes, str | None, bytes]:
    """DataReader fed `pieces` in turn until the end of data; what follows it. What it
    gave before a refusal is discarded, as the session does."""
    reader = DataReader(size_limit, line_limit)
    content = b""
    for number, piece in enumerate(pieces):
        more, end = reader.feed(piece)
        content += more
        if end is not None:
            rest = piece[end:] + b"".join(pieces[number + 1:])
            return b"" if reader.refusal else content, reader.refusal, rest
    raise AssertionError("the end of data was never found")


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


# Streams made of the bytes that matter (CR, LF, dot) and fillers, always with an end of
# data somewhere, then something pipelined after it.
body = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"aaaaa",
                                 b"a" * 18, b"a" * 19, b"a" * 20]), max_size=40).map(b"".join)
streams = st.builds(lambda text, extra: text + b"\r\n.\r\n" + extra if text else b".\r\n" + extra,
                    body, st.sampled_from([b"", b"NOOP\r\n", b".\r\n", b"\r\n.\r\n"]))


@settings(max_examples=1000, deadline=None)
@given(stream=streams, cuts=st.lists(st.integers(min_value=0), max_size=8),
       size_limit=st.sampled_from([SIZE_LIMIT, 0]))
def test_blocks_read_as_aiosmtpd_reads_lines(stream: bytes, cuts: list[int],
                                            size_limit: int) -> None:
    assert read_in_pieces(split(stream, cuts), size_limit, LINE_LIMIT) == \
        line_by_line(stream, size_limit, LINE_LIMIT)


@pytest.mark.parametrize(("stream", "content"), [
    (b".\r\n", b""),
    (b"a\r\n.\r\n", b"a\r\n"),
    (b"..\r\n.a\r\n.\r\n", b".\r\na\r\n"),
    (b"a\n.\r\nb\r.\r\n\r\n.\r\n", b"a\n.\r\nb\r.\r\n\r\n"),  # bare LF or CR: no end
])
def test_end_of_data_and_transparency(stream: bytes, content: bytes) -> None:
    assert read_in_pieces([stream + b"NOOP\r\n"], 1000, 1000) == (content, None, b"NOOP\r\n")


def test_nothing_past_a_limit_is_kept() -> None:
    """1 MiB without a line break against a 10,000-octet limit: refused as too long, and
    memory stays far below the stream's size."""
    pieces = [b"x" * 4096] * 256 + [b"\r\n.\r\n"]
    tracemalloc.start()
    try:
        result = read_in_pieces(pieces, 10_000, 1001)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == (b"", TOO_LONG, b"")
    assert peak < 256 * 1024, peak


# --- the relay's session against aiosmtpd's, in one event loop -------------------------

class Transport(asyncio.Transport):
    """The session's end of a connection, in memory, so that each piece arrives alone."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 25000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Keeper:
    """aiosmtpd's handler: keeps the content of DATA."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(envelope.content)
        return "250 OK"


class Sink:
    def __init__(self, into: list[bytes]) -> None:
        self.into = into
        self.parts: list[bytes] = []

    def write(self, content: bytes) -> None:
        self.parts.append(content)

    def discard(self) -> None:
        self.parts = []


class RelayKeeper(Keeper):
    """The relay session's policy: admits everyone, keeps the content it is given."""

    def admit(self, peer: Any) -> None:
        return None

    def release(self) -> None:
        pass

    def extensions(self) -> list[str]:
        return []

    def replied(self, reply: str) -> None:
        pass

    def begin_message(self, session: Session, envelope: RelayEnvelope) -> Sink:
        return Sink(self.messages)

    async def end_message(self, session: Session, envelope: RelayEnvelope, sink: Sink) -> str:
        self.messages.append(b"".join(sink.parts))
        return "250 OK"


class Limited(SMTP):
    line_length_limit = LINE_LIMIT


class RelayLimited(RelaySMTP):
    line_length_limit = LINE_LIMIT


async def converse(session: SMTP, pieces: list[bytes]) -> tuple[list[str], list[bytes]]:
    """Feed the session a transaction and then `pieces`, each once the session waits for
    more; its reply codes and the messages it kept."""
    transport = Transport()
    session.connection_made(transport)
    opening = b"EHLO c\r\nMAIL FROM:<a@e.x>\r\nRCPT TO:<b@e.x>\r\nDATA\r\n"
    for piece in [opening, *pieces]:
        session.data_received(piece)
        await waiting(session)
    session.eof_received()
    await waiting(session)
    codes = [line[:3].decode() for line in bytes(transport.written).split(b"\r\n")
             if line[3:4] == b" "]
    handler = session.event_handler
    return codes, handler.messages


async def waiting(session: SMTP) -> None:
    """Until the session has taken what it can and waits for more (or has ended)."""
    task = session._handler_coroutine
    for _ in range(1000):
        if task is None or task.done() or session._reader._waiter is not None:
            return
        await asyncio.sleep(0)  # let the session run: it is in memory, nothing to wait for
    raise AssertionError("the session neither waited nor ended")


@settings(max_examples=300, deadline=None)
@given(stream=streams, cuts=st.lists(st.integers(min_value=0), max_size=8),
       size_limit=st.sampled_from([SIZE_LIMIT, 0]))
def test_the_relay_session_answers_and_stores_what_aiosmtpd_does(
        stream: bytes, cuts: list[int], size_limit: int) -> None:
    # One QUIT, last: aiosmtpd acts on commands sent after it, the relay does not.
    pieces = split(stream + b"QUIT\r\n", cuts)

    async def both() -> tuple[Any, Any]:
        theirs = Limited(Keeper(), data_size_limit=size_limit or None, enable_SMTPUTF8=True)
        config = ListenConfig(max_message_size=size_limit)
        ours = RelayLimited(RelayKeeper(), config, "relay.example")  # type: ignore[arg-type]
        return await converse(theirs, pieces), await converse(ours, pieces)
    theirs, ours = asyncio.run(both())
    # After a reply that ends the session aiosmtpd still acts on what follows in the same
    # read (tests/test_smtp_server.py); the relay does not.
    assert (until_the_end(ours[0]), ours[1]) == (until_the_end(theirs[0]), theirs[1])
    assert until_the_end(ours[0]) == ours[0]


def until_the_end(codes: list[str]) -> list[str]:
    """The reply codes up to the first that ends a session."""
    for number, code in enumerate(codes):
        if code in ("221", "421", "502"):
            return codes[:number + 1]
    return codes

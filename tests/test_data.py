"""relay/data.py against the rules of RFC 5321 read one line at a time.

The reference below is the plain reading of the rules; DataReader must give the same
content or refusal for any stream, however the stream arrives in pieces, and say where
whatever follows the end of data begins.
"""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.data import TOO_LONG, TOO_MUCH, DataReader

LINE_LIMIT = 12  # small, so that short random streams pass it often
SIZE_LIMIT = 40


def reference(stream: bytes, size_limit: int, line_limit: int) -> tuple[bytes, str | None, bytes]:
    """(content, refusal, rest) line by line: lines end with CRLF only, a line ".\\r\\n"
    ends the data, the size counts every line before it, a leading dot is dropped."""
    lines, size, position = [], 0, 0
    while True:
        end = stream.find(b"\r\n", position)
        assert end != -1, "the strategy always ends the data"
        line = stream[position:end + 2]
        position = end + 2
        if line == b".\r\n":
            break
        lines.append(line)
        size += len(line)
    rest = stream[position:]
    if size > size_limit:
        return b"", TOO_MUCH, rest
    if any(len(line) > line_limit for line in lines):
        return b"", TOO_LONG, rest
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines), None, rest


def run(pieces: list[bytes], size_limit: int, line_limit: int) -> tuple[bytes, str | None, bytes]:
    """DataReader fed `pieces` in turn until the end of data; what follows it."""
    reader = DataReader(size_limit, line_limit)
    for number, piece in enumerate(pieces):
        end = reader.feed(piece)
        if end is not None:
            content, refusal = reader.result()
            return content, refusal, piece[end:] + b"".join(pieces[number + 1:])
    raise AssertionError("the end of data was never found")


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False)]


# Streams made of the bytes that matter (CR, LF, dot) and a filler, always with an end of
# data somewhere, then a pipelined command.
body = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"aaaaa"]),
                max_size=40).map(b"".join)
streams = st.builds(lambda text, extra: text + b"\r\n.\r\n" + extra if text else b".\r\n" + extra,
                    body, st.sampled_from([b"", b"QUIT\r\n", b".\r\n", b"\r\n.\r\n"]))


@settings(max_examples=400, deadline=None)
@given(stream=streams, cuts=st.lists(st.integers(min_value=0), max_size=6),
       size_limit=st.sampled_from([SIZE_LIMIT, 0]))
def test_data_reader_agrees_with_the_line_by_line_rules(stream: bytes, cuts: list[int],
                                                      size_limit: int) -> None:
    expected_content, expected_refusal, expected_rest = reference(
        stream, size_limit or 10**9, LINE_LIMIT)
    got = run(split(stream, cuts), size_limit, LINE_LIMIT)
    assert got == (expected_content, expected_refusal, expected_rest)


@pytest.mark.parametrize(("stream", "content"), [
    (b".\r\n", b""),
    (b"a\r\n.\r\n", b"a\r\n"),
    (b"..\r\n.a\r\n.\r\n", b".\r\na\r\n"),
    (b"a\n.\r\nb\r.\r\n\r\n.\r\n", b"a\n.\r\nb\r.\r\n\r\n"),  # bare LF or CR: no end
])
def test_end_of_data_and_transparency(stream: bytes, content: bytes) -> None:
    assert run([stream + b"QUIT\r\n"], 1000, 1000) == (content, None, b"QUIT\r\n")


def test_nothing_past_the_size_limit_is_kept() -> None:
    """1 MiB against a 10,000-octet limit: refused at the end of data (the size refusal
    wins over the long line), and memory stays far below the stream's size."""
    pieces = [b"x" * 4096] * 256 + [b"\r\n.\r\n"]
    tracemalloc.start()
    try:
        result = run(pieces, 10_000, 1001)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == (b"", TOO_MUCH, b"")
    assert peak < 256 * 1024, peak

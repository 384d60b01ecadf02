"""The DATA phase's rules applied to blocks: end of data, transparency, size and line limits.

aiosmtpd reads DATA one line at a time (a coroutine round trip and a copy per line);
relay.smtp_server reads it in blocks instead, and `DataReader` gives every block the same
meaning aiosmtpd's line-by-line reading gives it (RFC 5321 4.1.1.4, 4.5.2, 4.5.3.1), which
tests/test_data.py checks against aiosmtpd itself over random streams cut at random points:

- Lines end with CRLF only. DATA ends at the first line that is exactly ".\\r\\n"; the CRLF
  that ended the DATA command counts, so a message may be empty. A bare LF or CR never
  ends it (SMTP smuggling).
- A line that starts with "." loses that dot (transparency).
- The size is the sum of the lines before the end, CRLFs and doubled dots included; past
  `size_limit` the message is refused with 552. A line longer than `line_limit` octets is
  refused with 500. The first limit a line passes decides the reply, in aiosmtpd's order:
  a line whose text alone is over the limit fails before its octets are counted, a line
  over it only with its CRLF after. The reply waits for the end of data (RFC 5321 4.2.5),
  and nothing past a refusal is kept.
"""

from __future__ import annotations

import re

END_OF_DATA = b"\r\n.\r\n"
# The end of a block that may yet begin an end of data: held back until the next block.
_HELD = len(END_OF_DATA) - 1
TOO_MUCH = "552 5.3.4 Error: message size exceeds fixed maximum message size"
TOO_LONG = "500 5.5.2 Error: line too long (see RFC 5321 4.5.3.1.6)"
# A regular expression, not `in`: it leads with a literal byte, which it finds with memchr.
_DOT_AT_LINE_START = re.compile(rb"\r\n\.")


class DataReader:
    """One message's DATA. `feed` each block as it is read: it returns the content the
    block completes (dot-unstuffed, ready to store) and, once the end of data is in it, how
    much of the block belongs to the data (the rest is the client's next command). Then
    `refusal` is None, or the reply that refuses the message. A size limit of 0 or None is
    no limit."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self._size_limit = size_limit or 0
        self._line_limit = line_limit
        self.refusal: str | None = None
        self._size = 0  # octets of the complete lines so far, CRLFs included
        self._line = 0  # octets of the open line so far (a CR at its end included)
        # The last two octets taken: a CRLF, or a CRLF and a dot, may be split between
        # blocks. At first, the CRLF that ended the DATA command.
        self._before = b"\r\n"
        self._held = b""

    def feed(self, block: bytes) -> tuple[bytes, int | None]:
        """(content, end): the content this block completes, and None, or the length of
        the block's part that belongs to the data once its end has been seen."""
        held = self._held
        data = held + block if held else block
        end = (self._before + data[:_HELD]).find(END_OF_DATA)
        if end < 0:
            end = data.find(END_OF_DATA)
            if end >= 0:
                end += len(self._before)
        if end >= 0:
            # In `before + data` the message's last CRLF ends at end + 2, and the whole
            # end of data at end + 5.
            self._held = b""
            content = self._take(data[:end + 2 - len(self._before)])
            return content, end + len(END_OF_DATA) - len(self._before) - len(held)
        keep = min(_HELD, len(data))
        self._held = data[len(data) - keep:]
        return self._take(data[:len(data) - keep]), None

    def _take(self, raw: bytes) -> bytes:
        """Count `raw`, the next octets of the message's lines, and return them unstuffed
        (nothing once the message is refused)."""
        if not raw:
            return b""
        before = self._before
        self._before = (before + raw[-2:])[-2:]
        if self.refusal is None:
            self._count(before[-1:] + raw)
        if self.refusal is not None:
            return b""
        if raw[:1] != b"." and raw[:2] != b"\n." and not _DOT_AT_LINE_START.search(raw):
            return raw
        return (before + raw).replace(b"\r\n.", b"\r\n")[len(before):]

    def _count(self, text: bytes) -> None:
        """Count the lines in `text` (the octet before the new ones, then the new ones),
        setting `refusal` at the first limit passed."""
        new = len(text) - 1
        if (not self._size_limit or self._size + self._line + new <= self._size_limit) \
                and not self._may_hold_long_line(text):
            last = text.rfind(b"\r\n")
            if last < 0:
                self._line += new
            else:
                self._size += self._line + last + 1
                self._line = new - last - 1
            return
        self._count_lines(text)

    def _may_hold_long_line(self, text: bytes) -> bool:
        """Whether a line could reach the limit within `text`. A line that long covers a
        whole window of half the limit without a CRLF: one find per window, rather than an
        object per line."""
        reach = self._line_limit - 1  # a line's text this long fails with its CRLF
        if self._line + len(text) - 1 < reach:
            return False
        first = text.find(b"\r\n")
        if first < 0 or self._line + first - 1 >= reach:
            return True
        window = max(reach // 2, 1)
        return not all(text.find(b"\r\n", start, start + window) >= 0
                       for start in range(first, len(text) - window + 1, window))

    def _count_lines(self, text: bytes) -> None:
        """The exact reading, line by line, in aiosmtpd's order."""
        limit = self._line_limit
        start = 1  # where the open line's new octets begin in `text`
        while self.refusal is None:
            # From start - 1: the CR of the first CRLF may be the octet before the new ones.
            crlf = text.find(b"\r\n", start - 1)
            if crlf < 0:
                self._line += len(text) - start
                if self._line > limit:
                    self.refusal = TOO_LONG
                return
            length = self._line + crlf - start  # the line's text; its CRLF not included
            self._line = 0
            if length > limit:
                self.refusal = TOO_LONG
                return
            self._size += length + 2
            if self._size_limit and self._size > self._size_limit:
                self.refusal = TOO_MUCH
            elif length + 2 > limit:
                self.refusal = TOO_LONG
            start = crlf + 2

"""Text from outside (addresses, headers, replies, a client's HELO) made safe where the
relay shows or writes it. Two jobs, told apart by where the text goes:

- `escape`, for terminals and logs: control characters are shown as \\x1b, \\n and the
  like, so output can neither drive a terminal nor start a new log line; nothing is lost.
- `header_safe`, for a header field the relay writes: a header has no escape, so what
  could break the field (a control character, CR or LF; a space inside one word; a
  character outside ASCII in a 7-bit part) becomes "?".

relay.link.printable uses `escape` for the upstream's reply text as the relay keeps it.
"""

from __future__ import annotations


def escape(text: str, keep_newlines: bool = False) -> str:
    """Control characters shown as \\x1b and the like, so output cannot drive a terminal
    or split a log line. With `keep_newlines` (a message body), line breaks and tabs stay."""
    if text.isprintable():
        return text
    if keep_newlines:
        text = text.replace("\r\n", "\n")
        return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def header_safe(text: str, ascii_only: bool = False, spaces: bool = False) -> str:
    """`text` with every character that could break a header field as "?": control
    characters always, spaces unless `spaces`, and with `ascii_only` all but printable
    ASCII (a 7-bit message or MIME part)."""
    if text.isprintable() and (spaces or " " not in text) and (text.isascii() or not ascii_only):
        return text
    if ascii_only:
        first = " " if spaces else "!"
        return "".join(c if first <= c <= "~" else "?" for c in text)
    if spaces:
        return "".join(c if c.isprintable() else "?" for c in text)
    # The ASCII space is the one printable character that is also white space.
    return "".join(c if c.isprintable() and c != " " else "?" for c in text)

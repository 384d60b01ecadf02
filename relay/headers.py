"""Where a message's header section ends, read the way Postfix's cleanup reads it."""

from __future__ import annotations

import re

_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (each with its line ending) and the body after the empty line.

    A message that starts with a non-header line has no header and is all body. Reads
    only as far as the header goes, so a large body costs one slice.
    """
    head: list[bytes] = []
    position = 0
    while position < len(message):
        end = message.find(b"\n", position)
        end = len(message) if end < 0 else end + 1
        line = message[position:end]
        if line in (b"\r\n", b"\n"):
            return head, message[end:]
        if not (_HEADER_LINE.match(line) or (head and line[:1] in (b" ", b"\t"))):
            break
        head.append(line)
        position = end
    return head, message[position:]


def field_value(head: list[bytes], name: str) -> str | None:
    """The first `name:` field's value, unfolded, or None when there is none."""
    prefix = name.lower().encode() + b":"
    for number, line in enumerate(head):
        if line.lower().startswith(prefix):
            parts = [line[len(prefix):]]  # joined once: a long folded field stays linear
            for more in head[number + 1:]:
                if more[:1] not in (b" ", b"\t"):
                    break
                parts.append(more)
            return " ".join(b"".join(parts).decode("utf-8", "replace").split())
    return None

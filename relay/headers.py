"""Where a message's header section ends, read the way Postfix's cleanup reads it, and
its fields: the one reading of a header that the listener, the address rules, scheduling,
bounce notices, sendmail and `relay queue show` share."""

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


def fields(head: list[bytes]) -> list[tuple[str, str]]:
    """Every field of a header section (split_header's lines): its name and its value,
    unfolded, as field_value reads one."""
    found: list[tuple[bytes, list[bytes]]] = []  # joined once: a long folded field stays linear
    for line in head:
        if line[:1] in (b" ", b"\t") and found:
            found[-1][1].append(line)
        else:
            name, _, value = line.partition(b":")
            found.append((name, [value]))
    return [(name.decode("ascii"), _unfolded(b"".join(parts))) for name, parts in found]


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
            return _unfolded(b"".join(parts))
    return None


def _unfolded(value: bytes) -> str:
    return " ".join(value.decode("utf-8", "replace").split())

"""Finding records in the delivery history (relay.history's journal), fast.

A selective query (a queue ID, an address, a Message-ID, a status) over a million
records must answer in well under a second, and parsing every line as JSON would take
several. So each day file is mapped into memory and searched for the query's most
selective field as bytes ("to":"bob@example.com" appears as such on the line, whose
keys come in a fixed order); only the lines that hold it are parsed and checked
exactly. Day files outside --since/--until are not opened at all. Addresses and
Message-IDs match without regard to ASCII case (a case-insensitive regular expression,
which here is faster than lower-casing the file); `@example.com` matches a domain.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .history import FILE_NAME, Record, day_of, decode


@dataclass(frozen=True)
class Query:
    """What `relay history` asks for; None matches anything."""

    to: str | None = None
    sender: str | None = None
    message_id: str | None = None
    queue_id: str | None = None
    since: float | None = None
    until: float | None = None
    status: str | None = None

    def matches(self, record: Record) -> bool:
        """The exact test, after the byte search has found a candidate line."""
        return (_address_matches(self.to, record.recipient)
                and _address_matches(self.sender, record.sender)
                and (self.message_id is None or
                     _bare_id(record.message_id or "").lower() == _bare_id(self.message_id).lower())
                and (self.queue_id is None or record.id == self.queue_id.upper())
                and (self.status is None or record.status == self.status)
                and (self.since is None or record.at >= self.since)
                and (self.until is None or record.at < self.until))

    def needle(self) -> re.Pattern[bytes] | None:
        """A pattern every matching line contains, from the most selective field; None
        when nothing selective was asked (every line in range is parsed)."""
        if self.queue_id is not None:
            return re.compile(_field(b"id", self.queue_id.upper()))
        if self.message_id is not None:
            return re.compile(rb'"message_id":"<?' + _json_inner(_bare_id(self.message_id))
                              + rb'>?"', re.IGNORECASE)
        for key, address in ((b"to", self.to), (b"from", self.sender)):
            if address is None:
                continue
            if address.startswith("@"):
                return re.compile(rb'"' + key + rb'":"[^"\n]*' + _json_inner(address) + rb'"',
                                  re.IGNORECASE)
            return re.compile(_field(key, address), re.IGNORECASE)
        if self.status is not None and self.status != "sent":
            return re.compile(_field(b"status", self.status))
        return None


def search(directory: Path, query: Query) -> Iterator[Record]:
    """Every record matching `query`, day file by day file, in the order written."""
    pattern = query.needle()
    for path in day_files(directory, query.since, query.until):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as data:
                # Whatever follows the last newline is torn, or still being written.
                end = data.rfind(b"\n") + 1
                lines = _all_lines(data, end) if pattern is None else \
                    _matching_lines(data, end, pattern)
                for line in lines:
                    record = decode(line)
                    if record is not None and query.matches(record):
                        yield record


def day_files(directory: Path, since: float | None, until: float | None) -> list[Path]:
    """The journal's day files that can hold records in [since, until), oldest first (a
    record is filed under the UTC day of its own time)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    low = None if since is None else _day_name(since)
    high = None if until is None else _day_name(until)
    chosen = []
    for name in names:
        match = FILE_NAME.match(name)
        if not match:
            continue
        day = match.group(1)
        if (low is not None and day < low) or (high is not None and day > high):
            continue
        chosen.append(directory / name)
    return chosen


def _all_lines(data: mmap.mmap, end: int) -> Iterator[bytes]:
    start = 0
    while start < end:
        stop = data.find(b"\n", start, end)
        yield data[start:stop]
        start = stop + 1


def _matching_lines(data: mmap.mmap, end: int, pattern: re.Pattern[bytes]) -> Iterator[bytes]:
    position = 0
    while True:
        found = pattern.search(data, position, end)
        if found is None:
            return
        start = data.rfind(b"\n", 0, found.start()) + 1
        stop = data.find(b"\n", found.end() - 1, end)
        yield data[start:stop]
        position = stop + 1


def _day_name(timestamp: float) -> str:
    return day_of(max(timestamp, 0.0))


def _field(key: bytes, value: str) -> bytes:
    return re.escape(b'"' + key + b'":' + json.dumps(value, ensure_ascii=False).encode())


def _json_inner(value: str) -> bytes:
    """`value` as it appears inside a JSON string on a journal line, as a regex."""
    return re.escape(json.dumps(value, ensure_ascii=False).encode()[1:-1])


def _bare_id(message_id: str) -> str:
    return message_id.strip().removeprefix("<").removesuffix(">")


def _address_matches(wanted: str | None, address: str) -> bool:
    if wanted is None:
        return True
    if wanted.startswith("@"):
        return address.lower().endswith(wanted.lower())
    return address.lower() == wanted.lower()

"""The spool's two on-disk formats, and its queue IDs, as pure functions: bytes in, values
out, and back. No I/O here: the other parts of relay.spool read and write the files.

A message file is a magic line, one line of JSON envelope, then the content, byte for
byte as it will be sent. The envelope's last field is the content's size, right-aligned in
a field of fixed width (JSON allows the spaces), so that a file written as its content
arrives can have its size filled in without moving anything. The file never changes once
published.

A state record (state/<id>) is one JSON object: each recipient's status and last reply,
the attempts, the next attempt's time, the last error, and the times an operator set. An
entry without one has never been attempted or rescheduled.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from typing import Any

from ..entry import Attempt, Entry, NewEntry, Queue, Recipient, Status
from ..errors import CorruptEntry

MAGIC = b"RELAY-ENTRY 1\n"
SIZE_FIELD = 20  # digits kept for the size in the envelope: any size a disk can hold
HEADER_READ = 8192  # the first read of an entry: its envelope, unless it has many recipients
MAX_HEADER_BYTES = 64 * 1024 * 1024  # 100,000 recipients of 320 bytes fit with room to spare
# How far into a file its envelope's end is looked for.
ENVELOPE_LIMIT = len(MAGIC) + MAX_HEADER_BYTES
ID_PATTERN = re.compile(r"^[0-9A-F]{21}$")
_UNSAFE_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_ENVELOPE_END = b"}\n"
_decode_json = json.JSONDecoder().decode


# --- queue IDs and addresses ----------------------------------------------------------------

def new_id(now: float) -> str:
    """An ID that sorts by arrival and is never reused: microseconds, then 32 random bits.

    The bits need to be unique, not secret (the ID is told to the client, and its file is
    created with O_EXCL): the process's Mersenne Twister, seeded from the OS at start,
    spares every message a getrandom() system call."""
    return f"{int(now * 1_000_000):013X}{random.getrandbits(32):08X}"


def is_valid_id(entry_id: str) -> bool:
    """Queue IDs from outside (the command line) must match before they touch a path."""
    return bool(ID_PATTERN.match(entry_id))


def arrival_of(entry_id: str) -> float | None:
    """The arrival time a queue ID begins with (see new_id); None for anything else."""
    return int(entry_id[:13], 16) / 1_000_000 if is_valid_id(entry_id) else None


def is_unsafe_address(address: str) -> bool:
    """True for an address that must never reach an upstream's MAIL or RCPT line: a CR,
    LF or other control character, or a '<' or '>' that could end the path early and
    smuggle a parameter after it (CVE-2026-53533). Quoted local parts may hold them in
    RFC 5321's grammar; the relay refuses them at RCPT rather than relay them."""
    return bool(_UNSAFE_IN_ADDRESS.search(address))


# --- the message file -----------------------------------------------------------------------

def envelope_head(new: NewEntry, size: int) -> bytes:
    """The magic line and the one-line JSON envelope that begin an entry's file, with
    `size` as the content's size (size_field_at and size_field write it later)."""
    fields: dict[str, object] = {"id": new.id, "sender": new.sender,
                                 "recipients": list(new.recipients), "arrived": new.arrived,
                                 "smtputf8": new.smtputf8}
    if new.message_id is not None:
        fields["message_id"] = new.message_id
    if new.send_at is not None:
        fields["send_at"] = new.send_at
    # Only when the address rules rewrote the envelope; entries without them (and those
    # written before the rules existed) read as received unchanged.
    if new.original_sender is not None:
        fields["original_sender"] = new.original_sender
    if new.original_recipients is not None:
        fields["original_recipients"] = list(new.original_recipients)
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return MAGIC + f'{text[:-1]},"size":{size:>{SIZE_FIELD}}}}'.encode() + b"\n"


def size_field(size: int) -> bytes:
    """The envelope's size field holding `size`: always SIZE_FIELD bytes."""
    return f"{size:>{SIZE_FIELD}}".encode()


def size_field_at(head_size: int) -> int:
    """Where the size field begins in a head of `head_size` bytes (envelope_head's)."""
    return head_size - len(_ENVELOPE_END) - SIZE_FIELD


def parse_envelope(head: bytes, size: int, where: str) -> tuple[dict[str, Any], int] | None:
    """The envelope of a file of `size` bytes that begins with `head`, and the offset where
    its content begins; None if the envelope runs past `head` and the file has more to
    read (read more, and ask again with all of it). Raises CorruptEntry for a file that
    is not an entry, an envelope that is truncated or unreadable, or one wrong about the
    content's size; entry_from_envelope checks its fields."""
    if not head.startswith(MAGIC):
        raise CorruptEntry(where, "not a relay spool entry (bad or missing magic line)")
    end = head.find(b"\n", len(MAGIC))
    if end < 0 and len(head) < min(size, ENVELOPE_LIMIT):
        return None
    if end < 0 or end >= ENVELOPE_LIMIT:
        raise CorruptEntry(where, "truncated envelope")
    try:
        # Decoded to text first: json.loads would sniff bytes for UTF-16 and -32, which
        # the spool never writes, and build a decoder per call.
        header = _decode_json(head[len(MAGIC):end + 1].decode())
    except ValueError as exc:
        raise CorruptEntry(where, f"unreadable envelope: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptEntry(where, "envelope is not a JSON object")
    body_bytes = size - (end + 1)
    if header.get("size") != body_bytes:
        raise CorruptEntry(where, f"content is {body_bytes} bytes, envelope says "
                                  f"{header.get('size')}")
    return header, end + 1


def entry_from_envelope(header: dict[str, Any], queue: Queue, where: str) -> Entry:
    """The entry a decoded envelope describes, found in `queue` at the path `where`.
    Raises CorruptEntry for a missing or malformed field, or an ID not the file's name."""
    try:
        entry_id, sender, recipients = header["id"], header["sender"], header["recipients"]
        arrived, size, smtputf8 = header["arrived"], header["size"], header["smtputf8"]
    except KeyError as exc:
        raise CorruptEntry(where, f"envelope lacks {exc}") from None
    if not (isinstance(entry_id, str) and is_valid_id(entry_id) and where.endswith(entry_id)):
        raise CorruptEntry(where, "envelope ID does not match the file name")
    if not isinstance(recipients, list) or not recipients or "" in recipients:
        raise CorruptEntry(where, "envelope sender or recipients malformed")
    # One join and one check over all the addresses (a space is not among the unsafe
    # characters), not one per address: `relay queue` checks every one of every entry.
    try:
        addresses = " ".join((sender, *recipients))
    except TypeError:  # a non-string among them
        raise CorruptEntry(where, "envelope sender or recipients malformed") from None
    if is_unsafe_address(addresses):
        # The listener never stores these; a hand-edited file must not smuggle a CR/LF or
        # an extra <...> parameter onto the upstream's MAIL or RCPT line (CVE-2026-53533).
        raise CorruptEntry(where, "envelope address contains control characters or <>")
    if not isinstance(arrived, (int, float)) or not isinstance(smtputf8, bool):
        raise CorruptEntry(where, "envelope arrival time or flags malformed")
    send_at, message_id = header.get("send_at"), header.get("message_id")
    if not (send_at is None or isinstance(send_at, (int, float))) or \
            not (message_id is None or isinstance(message_id, str)):
        raise CorruptEntry(where, "envelope send time or Message-ID malformed")
    original_sender = header.get("original_sender")
    original_recipients = header.get("original_recipients")
    if not (original_sender is None or isinstance(original_sender, str)) or not (
            original_recipients is None or (isinstance(original_recipients, list) and all(
                isinstance(a, str) for a in original_recipients))):
        raise CorruptEntry(where, "envelope original sender or recipients malformed")
    return Entry(id=entry_id, queue=queue, sender=sender,
                 recipients=tuple(Recipient(a) for a in recipients),
                 arrived=float(arrived), size=size, smtputf8=smtputf8,
                 send_at=None if send_at is None else float(send_at), message_id=message_id,
                 original_sender=original_sender,
                 original_recipients=None if original_recipients is None
                 else tuple(original_recipients))


# --- the state record -----------------------------------------------------------------------

def encode_state(entry: Entry) -> bytes:
    """The state record of `entry`: what it holds beyond its immutable envelope."""
    record = {
        "recipients": [{"status": r.status.value, "reply": r.reply} for r in entry.recipients],
        "attempts": [{"at": a.at, "relay": a.relay, "reply": a.reply, "duration": a.duration}
                     for a in entry.attempts],
        "next_attempt": entry.next_attempt,
        "last_error": entry.last_error,
        "requeued": entry.requeued,
        "notice": entry.notice,
        "send_at": entry.send_at,
    }
    # Reply texts come printable from relay.link; should a lone surrogate get here all the
    # same, it is written as the JSON escape it reads back as, not refused.
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace")


def decode_state(data: bytes, entry: Entry, where: str) -> Entry:
    """`entry` (as its envelope describes it) with the state record `data` applied.
    Raises CorruptEntry for a record that is unreadable or does not fit the entry."""
    try:
        state = json.loads(data)
    except ValueError as exc:
        raise CorruptEntry(where, f"unreadable state record: {exc}") from None
    return _apply_state(entry, state, where)


def _apply_state(entry: Entry, state: Any, where: str) -> Entry:
    try:
        statuses = state["recipients"]
        if len(statuses) != len(entry.recipients):
            raise CorruptEntry(where, "state lists a different number of recipients")
        recipients = tuple(replace(r, status=Status(s["status"]), reply=s["reply"])
                           for r, s in zip(entry.recipients, statuses, strict=True))
        attempts = tuple(Attempt(at=float(a["at"]), relay=str(a["relay"]), reply=str(a["reply"]),
                                 duration=float(a["duration"])) for a in state["attempts"])
        next_attempt = state["next_attempt"]
        last_error = state["last_error"]
        requeued = state.get("requeued")
        notice = state.get("notice")
        send_at = state.get("send_at", entry.send_at)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(where, f"malformed state record: {exc!r}") from None
    if notice is not None and not (isinstance(notice, str) and is_valid_id(notice)):
        raise CorruptEntry(where, "malformed state record: notice is not a queue ID")
    return replace(entry, recipients=recipients, attempts=attempts,
                   next_attempt=None if next_attempt is None else float(next_attempt),
                   last_error=None if last_error is None else str(last_error),
                   requeued=None if requeued is None else float(requeued), notice=notice,
                   send_at=None if send_at is None else float(send_at))


# --- the daemon's view of its upstreams -----------------------------------------------------

def encode_upstreams(states: dict[str, Any]) -> bytes:
    """The file a running daemon publishes its upstreams' states in."""
    return json.dumps(states, separators=(",", ":")).encode()


def decode_upstreams(data: bytes) -> dict[str, Any] | None:
    """The states encode_upstreams wrote; None if `data` holds no JSON object. Raises
    ValueError for data that is not JSON."""
    states = json.loads(data)
    return states if isinstance(states, dict) else None

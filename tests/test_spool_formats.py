"""The spool's on-disk formats as pure functions (relay.spool.formats): bytes and back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.entry import Attempt, Entry, NewEntry, Queue, Recipient, Status
from relay.errors import CorruptEntry
from relay.spool.formats import (
    MAGIC,
    SIZE_FIELD,
    arrival_of,
    decode_state,
    decode_upstreams,
    encode_state,
    encode_upstreams,
    entry_from_envelope,
    envelope_head,
    is_unsafe_address,
    is_valid_id,
    new_id,
    parse_envelope,
    size_field,
    size_field_at,
)

ENTRY_ID = new_id(1_700_000_000.0)
WHERE = f"/spool/incoming/{ENTRY_ID}"
NEW = NewEntry(ENTRY_ID, "s@example.com", ("a@example.com", "b@example.net"), (), 1.5, True,
               send_at=7.25, message_id="<m@example.com>", original_sender="root",
               original_recipients=("root", "ops"))


def parse(data: bytes, queue: Queue = Queue.INCOMING) -> tuple[Entry, bytes]:
    """The entry and content of a whole message file, as a read of it would find them."""
    parsed = parse_envelope(data, len(data), WHERE)
    assert parsed is not None
    header, offset = parsed
    return entry_from_envelope(header, queue, WHERE), data[offset:]


def test_a_message_file_reads_back_as_written() -> None:
    """Every envelope field and the content come back from the bytes envelope_head began."""
    content = b"Subject: x\r\n\r\nbody\r\n"
    entry, body = parse(envelope_head(NEW, len(content)) + content, Queue.SCHEDULED)
    assert body == content
    assert entry == Entry(id=ENTRY_ID, queue=Queue.SCHEDULED, sender="s@example.com",
                          recipients=(Recipient("a@example.com"), Recipient("b@example.net")),
                          arrived=1.5, size=len(content), smtputf8=True, send_at=7.25,
                          message_id="<m@example.com>", original_sender="root",
                          original_recipients=("root", "ops"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc"),
                                      blacklist_characters="<> "), min_size=1),
                min_size=1, max_size=5), st.binary(max_size=200))
def test_any_recipients_and_content_round_trip(recipients: list[str], content: bytes) -> None:
    """Any safe addresses (non-ASCII included) and any content bytes read back unchanged."""
    new = NewEntry(ENTRY_ID, "s@example.com", tuple(recipients), (), 1.0, True)
    entry, body = parse(envelope_head(new, len(content)) + content)
    assert [r.address for r in entry.recipients] == recipients and body == content


def test_the_size_field_is_filled_in_place() -> None:
    """A head written with size 0 becomes the head for the final size by writing
    size_field at size_field_at: the same length, nothing moved."""
    draft = bytearray(envelope_head(NEW, 0))
    at = size_field_at(len(draft))
    draft[at:at + SIZE_FIELD] = size_field(123_456_789)
    assert bytes(draft) == envelope_head(NEW, 123_456_789)
    assert len(size_field(0)) == len(size_field(10 ** 19)) == SIZE_FIELD


def test_a_file_without_the_magic_line_is_corrupt() -> None:
    """Bytes that do not begin with the magic line are not an entry."""
    data = b"From: x\r\n\r\nbody"
    with pytest.raises(CorruptEntry, match="magic line"):
        parse_envelope(data, len(data), WHERE)


def test_an_envelope_past_the_bytes_read_asks_for_more() -> None:
    """No newline yet, and the file is longer: None, to read on; with all of it, parsed."""
    data = envelope_head(NEW, 3) + b"abc"
    assert parse_envelope(data[:20], len(data), WHERE) is None
    assert parse_envelope(data, len(data), WHERE) is not None


def test_an_envelope_without_its_end_is_truncated() -> None:
    """No newline after the envelope and nothing more in the file: truncated."""
    head = MAGIC + b'{"id":"x"'
    with pytest.raises(CorruptEntry, match="truncated envelope"):
        parse_envelope(head, len(head), WHERE)


def test_a_content_of_another_size_than_the_envelope_says_is_corrupt() -> None:
    """One byte short: the size check names both sizes."""
    data = envelope_head(NEW, 10) + b"x" * 9
    with pytest.raises(CorruptEntry, match="content is 9 bytes, envelope says 10"):
        parse_envelope(data, len(data), WHERE)


def test_an_envelope_naming_another_id_is_corrupt() -> None:
    """The envelope's ID must be the file's name."""
    data = envelope_head(NEW, 0)
    parsed = parse_envelope(data, len(data), WHERE)
    assert parsed is not None
    with pytest.raises(CorruptEntry, match="does not match the file name"):
        entry_from_envelope(parsed[0], Queue.INCOMING, f"/spool/incoming/{new_id(2.0)}")


def test_an_envelope_address_with_a_line_break_is_corrupt() -> None:
    """A hand-edited CR or LF in a recipient never reaches an RCPT line."""
    header = {"id": ENTRY_ID, "sender": "s@example.com", "recipients": ["a@x\r\nDATA"],
              "arrived": 1.0, "size": 0, "smtputf8": False}
    with pytest.raises(CorruptEntry, match="control characters"):
        entry_from_envelope(header, Queue.INCOMING, WHERE)


def entry() -> Entry:
    """An entry as its envelope describes it, before its state record is applied."""
    data = envelope_head(NEW, 0)
    return parse(data)[0]


def test_a_state_record_reads_back_as_written() -> None:
    """Statuses, replies, attempts and the operator's times survive encode and decode."""
    bare = entry()
    recorded = replace(
        bare, recipients=(Recipient("a@example.com", Status.SENT, "250 ok"),
                          Recipient("b@example.net", Status.PENDING, "451 later")),
        attempts=(Attempt(3.0, "mailgun", "451 later", 0.25),), next_attempt=9.0,
        last_error="451 later", requeued=4.0, notice=new_id(5.0), send_at=8.0)
    assert decode_state(encode_state(recorded), bare, WHERE) == recorded


def test_a_lone_surrogate_in_a_reply_is_written_as_its_escape() -> None:
    """A reply text with a lone surrogate is stored (as the JSON escape) and reads back."""
    bare = entry()
    odd = replace(bare, recipients=(Recipient("a@example.com", Status.PENDING, "4\udc80"),
                                    Recipient("b@example.net")))
    data = encode_state(odd)
    assert b"\\udc80" in data
    assert decode_state(data, bare, WHERE).recipients[0].reply == "4\udc80"


def test_a_state_record_for_other_recipients_is_corrupt() -> None:
    """A record listing a different number of recipients does not fit the entry."""
    record = json.loads(encode_state(entry()))
    record["recipients"].pop()
    with pytest.raises(CorruptEntry, match="different number of recipients"):
        decode_state(json.dumps(record).encode(), entry(), WHERE)


def test_a_state_record_that_is_not_json_is_corrupt() -> None:
    """Unreadable bytes are CorruptEntry naming the record, not a ValueError."""
    with pytest.raises(CorruptEntry, match="unreadable state record"):
        decode_state(b"{not json", entry(), WHERE)


def test_ids_sort_by_arrival_and_tell_it() -> None:
    """A later arrival sorts later, and arrival_of gives the microsecond back."""
    first, second = new_id(1_700_000_000.000001), new_id(1_700_000_000.000002)
    assert is_valid_id(first) and first < second
    assert arrival_of(second) == pytest.approx(1_700_000_000.000002, abs=1e-6)
    assert arrival_of("not-an-id") is None and not is_valid_id(first.lower())


@pytest.mark.parametrize("address", ["a@x\r", "a@x\n", "a\x00@x", "a@x> SIZE=1", "<a@x"])
def test_control_characters_and_angle_brackets_are_unsafe(address: str) -> None:
    """Whatever could end a MAIL or RCPT path early is unsafe."""
    assert is_unsafe_address(address)


def test_a_plain_address_is_safe() -> None:
    """An ordinary address, non-ASCII included, passes."""
    assert not is_unsafe_address("jürgen@exämple.com")


def test_published_upstream_states_read_back_and_anything_else_is_none() -> None:
    """The daemon's view round-trips; JSON that is not an object reads as None."""
    states = {"mailgun": {"state": "open", "until": 5.0, "reason": "451"}}
    assert decode_upstreams(encode_upstreams(states)) == states
    assert decode_upstreams(b"[1, 2]") is None

"""The one reading of a header section (relay.headers), and `relay queue show` using it."""

from __future__ import annotations

import pytest

from relay.entry import Entry, Queue, Recipient
from relay.headers import field_value, fields, split_header
from relay.views import detail_json, show


@pytest.mark.parametrize(("message", "head", "body"), [
    (b"Subject: s\r\nTo: t\r\n\r\nbody\r\n", [b"Subject: s\r\n", b"To: t\r\n"], b"body\r\n"),
    (b"Subject: s\nTo: t\n\nbody\n", [b"Subject: s\n", b"To: t\n"], b"body\n"),
    (b"not a header\r\nSubject: s\r\n\r\nbody", [], b"not a header\r\nSubject: s\r\n\r\nbody"),
    (b"Subject: s\r\nnot a header\r\n\r\nbody", [b"Subject: s\r\n"],
     b"not a header\r\n\r\nbody"),
])
def test_the_header_section_ends_at_the_empty_line_or_the_first_line_that_is_no_field(
        message: bytes, head: list[bytes], body: bytes) -> None:
    """CRLF or LF lines; a line that is not a field (nor its continuation) starts the body."""
    assert split_header(message) == (head, body)


def test_fields_are_listed_in_order_with_folded_values_unfolded() -> None:
    """Each field once, continuation lines joined, white space collapsed."""
    head = split_header(b"Subject: a\r\n  long\r\n\tsubject\r\nX-A:b\r\n\r\n")[0]
    assert fields(head) == [("Subject", "a long subject"), ("X-A", "b")]
    assert field_value(head, "subject") == "a long subject"


def test_queue_show_reads_the_header_as_the_listener_does() -> None:
    """A message with LF line ends shows its fields, and its body apart from them."""
    entry = Entry(id="0" * 21, queue=Queue.INCOMING, sender="a@example.com",
                  recipients=(Recipient("b@example.com"),), arrived=0.0, size=30)
    content = b"Subject: hello\nTo: b@example.com\n\nthe body\n"
    assert "  Subject: hello\n  To: b@example.com\n\nthe body" in show(entry, content, True)
    detail = detail_json(entry, content, with_body=True)
    assert detail["headers"] == [{"name": "Subject", "value": "hello"},
                                 {"name": "To", "value": "b@example.com"}]
    assert detail["body"] == "the body\n"

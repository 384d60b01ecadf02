"""How a reply of the upstream is kept (relay.link.printable): printable, one line,
every byte shown, and bounded."""

from __future__ import annotations

from relay.link import MAX_REPLY_TEXT, printable


def test_bytes_that_are_not_utf8_are_shown_escaped_and_encodable() -> None:
    """Latin-1 from a real server, decoded with surrogateescape as aiosmtplib does."""
    kept = printable(b"450 4.2.1 bo\xeete pleine".decode("utf-8", "surrogateescape"))
    assert kept == "450 4.2.1 bo\\xeete pleine"
    kept.encode("utf-8")  # a state record can hold it


def test_a_multiline_reply_with_control_characters_becomes_one_printable_line() -> None:
    kept = printable("550-5.1.1 first\r\n550 5.1.1 sec\x00ond\x1b[31m")
    assert "\n" not in kept and kept.isprintable()
    assert kept.startswith("550-5.1.1 first 550 5.1.1 sec")


def test_a_long_reply_is_cut_to_the_bound_and_says_so() -> None:
    kept = printable("451 " + "x" * 5000)
    assert len(kept) == MAX_REPLY_TEXT and kept.endswith("…")
    assert printable("451 " + "x" * 100) == "451 " + "x" * 100

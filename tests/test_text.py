"""Text from outside made safe: escaped for terminals and logs, replaced in headers."""

from __future__ import annotations

import pytest

from relay.text import escape, header_safe


@pytest.mark.parametrize(("text", "shown"), [
    ("plain text", "plain text"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("two\r\nlines", "two\\r\\nlines"),
    ("tab\there", "tab\\there"),
    ("caf\u00e9", "caf\u00e9"),
])
def test_escape_shows_control_characters_and_keeps_the_rest(text: str, shown: str) -> None:
    """Every control character becomes visible text; printable text stays as it is."""
    assert escape(text) == shown


def test_escape_can_keep_the_lines_of_a_body() -> None:
    """With keep_newlines a body keeps its line breaks and tabs, CRLF as one newline."""
    assert escape("a\r\nb\tc\x1bd", keep_newlines=True) == "a\nb\tc\\x1bd"


@pytest.mark.parametrize(("text", "ascii_only", "spaces", "safe"), [
    ("host.example", False, False, "host.example"),
    ("evil\r\nX-Injected: 1", False, False, "evil??X-Injected:?1"),
    ("h\u00f6st", False, False, "h\u00f6st"),
    ("h\u00f6st name", True, False, "h?st?name"),
    ("4.4.7 expired \u00e9\x00", True, True, "4.4.7 expired ??"),
])
def test_header_safe_replaces_what_could_break_a_field(text: str, ascii_only: bool,
                                                       spaces: bool, safe: str) -> None:
    """CR, LF and other control characters always become "?"; spaces and 8-bit text as
    asked."""
    assert header_safe(text, ascii_only=ascii_only, spaces=spaces) == safe

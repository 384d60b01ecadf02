"""The listener's own SMTP protocol (relay/smtpd.py): paths, commands it does not offer,
pipelined input, and clients that are not speaking SMTP."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import RelayProcess, relay_config, wait_for
from relay.smtpd import parse_path


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    """A relay without upstream: whatever it accepts stays in its spool for inspection."""
    return make_relay(relay_config(tmp_path, None, None))


def replies_to(relay: RelayProcess, payload: bytes) -> list[bytes]:
    """Send raw bytes at once after the greeting; every final reply line until the relay
    closes the connection (the payload ends with QUIT or provokes a goodbye)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(payload)
        return [line.rstrip(b"\r\n") for line in reader if line[3:4] == b" "]


@pytest.mark.parametrize(("argument", "parsed"), [
    ("<a@example.com>", ("a@example.com", "")),
    ("<>", ("", "")),
    (" <a@example.com>  SIZE=10 BODY=8BITMIME", ("a@example.com", "SIZE=10 BODY=8BITMIME")),
    ('<"a>b c"@example.com>', ('"a>b c"@example.com', "")),
    ('<"a\\"> x"@example.com>', ('"a\\"> x"@example.com', "")),
    ("<@relay.example,@b.example:user@example.com>", ("user@example.com", "")),
    ("a@example.com SIZE=10", ("a@example.com", "SIZE=10")),
])
def test_paths_are_parsed_as_rfc_5321_writes_them(argument: str,
                                                  parsed: tuple[str, str]) -> None:
    """Brackets, the null path, quoted local parts, source routes, bare mailboxes."""
    assert parse_path(argument) == parsed


@pytest.mark.parametrize("argument", [
    "<a@example.com", "<a@<b>.example>", "<a@example.com>SIZE=10", "<@relay.example>", "",
])
def test_malformed_paths_are_refused(argument: str) -> None:
    """An unclosed bracket, a bracket inside, parameters glued on, a route without mailbox."""
    assert parse_path(argument) is None


def test_quoted_local_part_with_a_space_is_queued_whole(holding_relay: RelayProcess) -> None:
    """A space inside quotes does not end the path; the sender is stored as sent."""
    replies = replies_to(holding_relay, b'EHLO c.example\r\nMAIL FROM:<"odd name"@example.com>\r\n'
                         b"RCPT TO:<u@example.com>\r\nDATA\r\n"
                         b"Subject: q\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    entry_id = replies[4].rsplit(b" ", 1)[1].decode()
    shown = holding_relay.cli("queue", "show", entry_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["sender"] == '"odd name"@example.com'


def test_bracket_in_a_quoted_local_part_is_refused(holding_relay: RelayProcess) -> None:
    """RFC 5321 allows '"a>b"@x', but on an upstream's RCPT line it could end the path
    early (CVE-2026-53533): refused with 553 rather than accepted and never relayed."""
    replies = replies_to(holding_relay, b'EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n'
                         b'RCPT TO:<"odd>name"@example.com>\r\nQUIT\r\n')
    assert replies[2].startswith(b"553 5.1.3 Error: bad recipient address syntax: ")
    assert b"'<' or '>'" in replies[2]


def test_starttls_and_auth_are_neither_offered_nor_accepted(holding_relay: RelayProcess) -> None:
    """Local clients on trusted networks only: no TLS, no AUTH, and the session goes on."""
    replies = replies_to(holding_relay, b"EHLO c.example\r\nSTARTTLS\r\nAUTH PLAIN AGFAYg==\r\n"
                         b"NOOP\r\nQUIT\r\n")
    assert replies == [b"250 HELP", b"502 5.5.1 Error: command not implemented",
                       b"503 5.5.1 Error: authentication not enabled", b"250 2.0.0 Ok",
                       b"221 2.0.0 Bye"]


def test_help_lists_the_commands(holding_relay: RelayProcess) -> None:
    """RFC 5321 4.1.1.8: HELP answers 214."""
    [help_reply, _] = replies_to(holding_relay, b"HELP\r\nQUIT\r\n")
    assert help_reply.startswith(b"214 2.0.0 Commands: ") and b"MAIL" in help_reply


def test_mail_before_helo_and_rcpt_before_mail_are_out_of_sequence(
        holding_relay: RelayProcess) -> None:
    """503 5.5.1 for each, and the session recovers once the order is right."""
    replies = replies_to(holding_relay, b"MAIL FROM:<a@example.com>\r\nHELO c.example\r\n"
                         b"RCPT TO:<u@example.com>\r\nMAIL FROM:<a@example.com>\r\n"
                         b"MAIL FROM:<a@example.com>\r\nDATA\r\nQUIT\r\n")
    assert [r[:3] for r in replies] == [b"503", b"250", b"503", b"250", b"503", b"503", b"221"]
    assert replies[0] == b"503 5.5.1 Error: send HELO first"
    assert replies[4] == b"503 5.5.1 Error: nested MAIL command"
    assert replies[5] == b"503 5.5.1 Error: need RCPT command"


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\r\n", b"MAIL FROM:<\xff@example.com>\r\n",
])
def test_a_client_not_speaking_smtp_is_sent_away(holding_relay: RelayProcess,
                                                 garbage: bytes) -> None:
    """HTTP, TLS or invalid UTF-8, five times: 500 each time, then 502 and goodbye."""
    replies = replies_to(holding_relay, b"EHLO c.example\r\n" + garbage * 6)
    assert [r[:3] for r in replies[1:]] == [b"500"] * 4 + [b"502"]
    assert replies[-1] == b"502 5.5.1 Too many unrecognized commands, goodbye."


def test_pipelined_messages_on_one_connection_are_each_queued(
        holding_relay: RelayProcess) -> None:
    """Three transactions in one write, the next MAIL right behind each final dot: each is
    answered in order after its own message is on disk."""
    transaction = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
                   b"Subject: p\r\n\r\nbody\r\n.\r\n")
    replies = replies_to(holding_relay, b"EHLO c.example\r\n" + transaction * 3 + b"QUIT\r\n")
    assert [r[:3] for r in replies] == [b"250"] + [b"250", b"250", b"354", b"250"] * 3 + [b"221"]
    ids = {r.rsplit(b" ", 1)[1].decode() for r in replies if b"queued as" in r}
    assert len(ids) == 3
    wait_for(lambda: set(holding_relay.files("incoming") + holding_relay.files("deferred")
                         + holding_relay.files("active")) == ids, what="three entries")

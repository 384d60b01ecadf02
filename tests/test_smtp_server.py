"""The listener's session: aiosmtpd's SMTP with the relay's overrides (relay/smtp_server.py).

The first half pins each override to what aiosmtpd does underneath: if aiosmtpd changes
what an override relies on, one of these fails. The second half sends the exact bytes of
each finding of the listener review (issue 18) and proves it fixed.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from conftest import RelayProcess, relay_config, wait_for
from test_data import RelayKeeper, Transport, waiting
from upstream import Upstream

import relay.smtp_server
from relay.addresses import rules_for
from relay.config import AddressesConfig, Config, ListenConfig
from relay.hostname import system_name
from relay.listener import Admission, Handler
from relay.metrics import Recorder
from relay.smtp_server import MAIL_LINE_LIMIT, RelayEnvelope, RelaySMTP


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    """A relay without upstream: whatever it accepts stays in its spool for inspection."""
    return make_relay(relay_config(tmp_path, None, None))


def replies_to(relay: RelayProcess, payload: bytes) -> list[bytes]:
    """Send raw bytes in one write after the greeting; every final reply line until the
    relay closes the connection (the payload ends with QUIT or provokes a goodbye)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(payload)
        return [line.rstrip(b"\r\n") for line in reader if line[3:4] == b" "]


TRANSACTION = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
               b"Subject: x\r\n\r\nbody\r\n.\r\n")


class Session:
    """A RelaySMTP in memory, fed bytes and asked what it wrote."""

    def __init__(self, config: ListenConfig | None = None) -> None:
        self.policy = Policy()
        self.smtp = RelaySMTP(self.policy, config or ListenConfig(), "relay.example")  # type: ignore[arg-type]
        self.transport = Transport()

    async def start(self) -> None:
        self.smtp.connection_made(self.transport)
        await waiting(self.smtp)
        await asyncio.sleep(0)  # the greeting is written once the loop runs

    async def send(self, data: bytes) -> list[bytes]:
        """Feed `data`; the final reply lines written in answer."""
        before = len(self.transport.written)
        self.smtp.data_received(data)
        await waiting(self.smtp)
        await asyncio.sleep(0)  # the replies of one read are written once the loop runs
        said = bytes(self.transport.written[before:])
        return [line for line in said.split(b"\r\n") if line[3:4] == b" "]


class Policy(RelayKeeper):
    released = 0

    def release(self) -> None:
        self.released += 1


# --- the overrides, pinned to aiosmtpd ---------------------------------------------------

@pytest.mark.parametrize(("command", "reply"), [
    (b"NOOP", b"250 2.0.0 OK"),
    (b"RSET", b"250 2.0.0 OK"),
    (b"MAIL FROM:<a@example.com>", b"503 5.5.1 Error: send HELO first"),
    (b"EHLO", b"501 5.5.4 Syntax: EHLO hostname"),
    (b"XYZZY " + b"x" * 300, b"500 5.5.2 Error: command not recognized"),
    (b"VRFY <<>", b"502 5.5.2 Error: cannot VRFY that"),
    (b"EXPN staff", b"502 5.5.1 EXPN not implemented"),
    (b"DATA", b"503 5.5.1 Error: send HELO first"),
    (b"HELP", b"214 2.0.0 Commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"),
    (b"QUIT", b"221 2.0.0 Bye"),
])
def test_aiosmtpd_replies_carry_enhanced_codes_and_echo_nothing(command: bytes,
                                                                reply: bytes) -> None:
    """aiosmtpd's own replies, by their exact text, get RFC 3463 codes; the ones that
    repeat the client's words are replaced."""
    async def run() -> list[bytes]:
        session = Session()
        await session.start()
        return await session.send(command + b"\r\n")
    assert asyncio.run(run()) == [reply]


def test_every_session_has_its_own_fixed_mail_line_limit() -> None:
    """aiosmtpd raises a class-wide MAIL limit at each EHLO; each session keeps its own."""
    async def run() -> tuple[list[bytes], list[bytes]]:
        session = Session()
        await session.start()
        for _ in range(5):
            await session.send(b"EHLO c.example\r\n")
        fits = b"MAIL FROM:<" + b"a" * (MAIL_LINE_LIMIT - 22) + b"@e.example>"
        assert len(fits) == MAIL_LINE_LIMIT
        first = await session.send(fits + b"\r\nRSET\r\n")
        second = await session.send(fits + b"x\r\n")
        return first, second
    first, second = asyncio.run(run())
    assert first[0] == b"250 2.0.0 OK" and second == [b"500 5.5.2 Command line too long"]
    assert SMTP.command_size_limits["MAIL"] == SMTP.command_size_limit


def test_parsed_paths_are_remembered() -> None:
    """aiosmtpd parses MAIL's path through _getaddr, which the relay caches."""
    relay.smtp_server._PATHS.clear()

    async def run() -> Any:
        session = Session()
        await session.start()
        await session.send(b"EHLO c.example\r\nMAIL FROM:<kept@example.com> SIZE=10\r\n")
        return session.smtp.envelope
    envelope = asyncio.run(run())
    assert relay.smtp_server._PATHS[" <kept@example.com> SIZE=10".strip()] == \
        ("kept@example.com", "SIZE=10")
    assert isinstance(envelope, RelayEnvelope) and envelope.declared_size == 10


def test_listing_only_the_method_names_finds_every_method_aiosmtpd_looks_for() -> None:
    """aiosmtpd builds its tables of commands, AUTH mechanisms and hooks from dir(); with
    the session's short dir() they come out as with the whole one."""
    class WholeDir(RelaySMTP):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        policy = Policy()
        short = RelaySMTP(policy, ListenConfig(), "relay.example")  # type: ignore[arg-type]
        whole = WholeDir(policy, ListenConfig(), "relay.example")  # type: ignore[arg-type]
        return vars(short), vars(whole)
    short, whole = asyncio.run(run())
    tables = [name for name, value in whole.items() if isinstance(value, dict)]
    assert {"_smtp_methods", "_auth_methods", "_handle_hooks"} <= set(tables)
    for name in tables:
        assert sorted(short[name]) == sorted(whole[name]), name


def test_listing_only_the_hooks_finds_every_hook_of_the_listener() -> None:
    """The same for the listener's handler, whose dir() lists its hooks only."""
    class WholeDir(Handler):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    def hooks(handler: Handler) -> list[str]:
        async def run() -> list[str]:
            return sorted(RelaySMTP(handler, ListenConfig(), "relay.example")._handle_hooks)
        return asyncio.run(run())
    rules = rules_for(AddressesConfig(hostname="relay.example"), system_name())
    args: Any = (None, None, Config(), Admission((), 1), None, rules, Recorder())
    assert hooks(Handler(*args)) == hooks(WholeDir(*args)) == ["MAIL", "RCPT", "exception"]


def test_the_idle_timeout_aborts_a_client_that_does_not_read() -> None:
    """A transport whose close() waits for a write buffer the client never drains: the
    timeout aborts it, and the connection's slot is given back at once."""
    class Stuck(Transport):
        def close(self) -> None:
            self.closed = True  # a real transport would wait for the buffer to drain

        def abort(self) -> None:
            self.closed = True
            smtp.connection_lost(None)

    async def run() -> tuple[int, bytes]:
        nonlocal smtp
        session = Session(ListenConfig(timeout=0.05))
        smtp = session.smtp
        session.transport = Stuck()
        await session.start()
        deadline = asyncio.get_running_loop().time() + 5
        while not session.policy.released:
            assert asyncio.get_running_loop().time() < deadline, "the slot was never freed"
            await asyncio.sleep(0.01)
        return session.policy.released, bytes(session.transport.written)
    smtp: Any = None
    released, written = asyncio.run(run())
    assert released == 1
    assert written.endswith(b"421 4.4.2 Error: timeout exceeded\r\n")


def test_asyncio_reads_into_the_sessions_own_buffer() -> None:
    """A real loopback connection: asyncio's transport hands a BufferedProtocol its reads
    through get_buffer/buffer_updated, and the session parses what arrived that way."""
    class Counting(RelaySMTP):
        buffers = 0

        def get_buffer(self, sizehint: int) -> memoryview:
            Counting.buffers += 1
            return super().get_buffer(sizehint)

    async def run() -> bytes:
        loop = asyncio.get_running_loop()
        policy = Policy()
        server = await loop.create_server(
            lambda: Counting(policy, ListenConfig(), "relay.example"),  # type: ignore[arg-type]
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"NOOP\r\nQUIT\r\n")
        said = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return said
    said = asyncio.run(run())
    assert said == b"250 2.0.0 OK\r\n221 2.0.0 Bye\r\n"
    assert Counting.buffers >= 1


def test_the_replies_to_one_read_go_out_in_one_write() -> None:
    """aiosmtpd writes each reply as it is made; the session holds them while the reader
    still has whole lines (its StreamReader's `_buffer`), and writes an EHLO reply whole."""
    class Writes(Transport):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: Any) -> None:
            super().write(data)
            self.writes.append(bytes(data))

    async def run() -> list[bytes]:
        session = Session()
        session.transport = Writes()
        await session.start()
        assert isinstance(session.smtp._reader._buffer, bytearray)
        await session.send(b"EHLO c.example\r\n")
        await session.send(b"NOOP\r\nNOOP\r\nNOOP\r\n")
        return session.transport.writes
    greeting, ehlo, noops = asyncio.run(run())
    assert greeting.startswith(b"220 ")
    assert ehlo.startswith(b"250-relay.example\r\n") and ehlo.count(b"\r\n250 ") == 1
    assert noops == b"250 2.0.0 OK\r\n" * 3


def test_354_is_written_at_once_when_content_follows_data_in_the_same_read() -> None:
    """DATA and the first content line in one write: what the reader then holds is
    content, not commands, so the 354 goes out without waiting for the end of data."""
    async def run() -> list[bytes]:
        session = Session()
        await session.start()
        return await session.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n"
                                  b"RCPT TO:<u@example.com>\r\nDATA\r\nSubject: x\r\n")
    replies = asyncio.run(run())
    assert replies[-1].startswith(b"354 ")


# --- the listener review's findings, each with its exact bytes -------------------------

@pytest.mark.parametrize("preamble", [
    b"EHLO c\r\nQUIT\r\n",
    b"EHLO c\r\n" + b"NOOP\r\n" * 21,
    b"EHLO c\r\n" + b"XYZZY\r\n" * 5,
])
def test_nothing_sent_after_a_reply_that_ends_the_session_is_acted_on(
        holding_relay: RelayProcess, preamble: bytes) -> None:
    """QUIT, 421 (too many commands) or the fifth unknown command, then a whole
    transaction in the same write: the session ends at that reply, nothing is queued."""
    replies = replies_to(holding_relay, preamble + TRANSACTION)
    assert replies[-1][:3] in (b"221", b"421", b"502")
    assert not any(r.startswith((b"354", b"250 2.1")) for r in replies)
    # A message stored later by another session: the spool writer takes stores in order.
    barrier = holding_relay.send("a@example.com", ["barrier@example.com"], b"Subject: b\r\n\r\n")
    assert holding_relay.queued() == [barrier]

    async def in_memory() -> tuple[list[bytes], list[bytes]]:
        session = Session()
        await session.start()
        return await session.send(preamble + TRANSACTION), session.policy.messages
    replies, kept = asyncio.run(in_memory())
    assert replies[-1][:3] in (b"221", b"421", b"502") and kept == []


def test_an_http_post_submits_nothing(holding_relay: RelayProcess) -> None:
    """What Python's http.client writes at once for a POST whose body is a transaction."""
    body = b"EHLO c\r\nQUIT\r\n" + TRANSACTION
    post = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)
    replies_to(holding_relay, post)
    barrier = holding_relay.send("a@example.com", ["barrier@example.com"], b"Subject: b\r\n\r\n")
    assert holding_relay.queued() == [barrier]


def test_rset_counts_toward_the_limit_of_commands_without_mail(
        holding_relay: RelayProcess) -> None:
    """RSET, NOOP, VRFY, EXPN, HELP, EHLO and HELO share one count: the 21st ends it."""
    commands = [b"RSET", b"NOOP", b"VRFY a", b"EXPN a", b"HELP", b"HELO c"] * 3 + [b"RSET"] * 5
    replies = replies_to(holding_relay, b"EHLO c\r\n" + b"\r\n".join(commands) + b"\r\n")
    assert len(replies) == 21
    assert replies[-1] == b"421 4.7.0 Error: too many commands without mail"


def test_refused_commands_count_toward_the_error_limit(holding_relay: RelayProcess) -> None:
    """Refused commands reset the idle timer, so they are counted: the 21st error ends it."""
    replies = replies_to(holding_relay, b"EHLO c\r\n" + b"MAIL FROM:<a..b@example.com>\r\n" * 25)
    assert [r[:3] for r in replies[1:]] == [b"553"] * 21 + [b"421"]
    assert replies[-1] == b"421 4.7.0 Error: too many errors"


def test_the_counts_start_again_with_each_message_queued(holding_relay: RelayProcess) -> None:
    """A client sending message after message with an RSET before each is never cut off."""
    replies = replies_to(holding_relay, b"EHLO c\r\n" + (b"RSET\r\n" * 15 + TRANSACTION) * 3
                         + b"QUIT\r\n")
    assert sum(r.startswith(b"250 2.0.0 Ok: queued") for r in replies) == 3
    assert replies[-1] == b"221 2.0.0 Bye"


@pytest.mark.parametrize("parameter", ["SIZE=\u00b2", "SIZE=", "SIZE=1x", "SIZE"])
def test_a_malformed_size_parameter_gets_501(holding_relay: RelayProcess,
                                             parameter: str) -> None:
    """`SIZE=²` passes str.isdigit(); it and its kin get 501, never 451 or a traceback."""
    replies = replies_to(holding_relay, b"EHLO c\r\nMAIL FROM:<a@example.com> "
                         + parameter.encode() + b"\r\nQUIT\r\n")
    assert replies[1][:3] == b"501", replies
    assert "Traceback" not in holding_relay.log()


@pytest.mark.parametrize("length", [600, 1200, 5000])
def test_replies_never_echo_a_long_command(holding_relay: RelayProcess, length: int) -> None:
    """An unknown command of any length: a short reply without the client's text."""
    replies = replies_to(holding_relay, b"EHLO c\r\n" + b"Z" * length + b"\r\nQUIT\r\n")
    assert all(len(r) + 2 <= 512 and b"ZZZ" not in r for r in replies)
    assert replies[1][:3] == b"500"


@pytest.mark.parametrize("postmaster", ["Postmaster", "postmaster", "POSTMASTER"])
def test_postmaster_without_a_domain_is_accepted(holding_relay: RelayProcess,
                                                 postmaster: str) -> None:
    """RFC 5321 4.1.1.3: <Postmaster> in any case; relayed as postmaster at our name."""
    replies = replies_to(holding_relay, b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<"
                         + postmaster.encode() + b">\r\nDATA\r\nSubject: p\r\n\r\nx\r\n.\r\n"
                         b"QUIT\r\n")
    assert replies[2] == b"250 2.1.5 Ok"
    entry_id = replies[4].rsplit(b" ", 1)[1].decode()
    shown = json.loads(holding_relay.cli("queue", "show", entry_id, "--json").stdout)
    assert [r["address"] for r in shown["recipients"]] == [f"postmaster@{socket.gethostname()}"]


def test_a_non_ascii_helo_name_keeps_a_7bit_message_7bit(make_upstream: Any, make_relay: Any,
                                                         tmp_path: Path, ca_file: Path) -> None:
    """EHLO with 8-bit text and a control character: the Received: header carries a
    printable ASCII name, and the upstream's MAIL asks for no 8BITMIME."""
    upstream: Upstream = make_upstream()
    relay_process = make_relay(relay_config(tmp_path, upstream, ca_file))
    replies = replies_to(relay_process, "EHLO h\u00f4te_\u00e9\x01\r\n".encode()
                         + TRANSACTION + b"QUIT\r\n")
    assert replies[4].startswith(b"250 2.0.0 Ok: queued")
    [delivered] = wait_for(lambda: upstream.delivered_to("u@example.com"), what="delivery")
    assert delivered.data.isascii()
    assert delivered.data.startswith(b"Received: from h?te_?? ([127.0.0.1])")
    assert "BODY=8BITMIME" not in delivered.mail_options
    underscores = replies_to(relay_process, b"EHLO win_host.example\r\nQUIT\r\n")
    assert underscores[0].startswith(b"250 ")


# --- the rest of the protocol the contract describes -----------------------------------

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
    assert replies[0] == b"250 HELP"
    assert replies[1][:1] in (b"4", b"5") and replies[2][:1] in (b"4", b"5")
    assert replies[3:] == [b"250 2.0.0 OK", b"221 2.0.0 Bye"]
    with holding_relay.client() as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("starttls") and not smtp.has_extn("auth")


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


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\r\n"])
def test_a_client_not_speaking_smtp_is_sent_away(holding_relay: RelayProcess,
                                                 garbage: bytes) -> None:
    """HTTP or TLS on the plain port: errors, then the session ends."""
    replies = replies_to(holding_relay, b"EHLO c.example\r\n" + garbage * 25)
    assert all(r[:1] == b"5" for r in replies[1:-1])
    assert replies[-1] in (b"502 5.5.1 Too many unrecognized commands, goodbye.",
                           b"421 4.7.0 Error: too many errors")


def test_pipelined_messages_on_one_connection_are_each_queued(
        holding_relay: RelayProcess) -> None:
    """Three transactions in one write, the next MAIL right behind each final dot: each is
    answered in order after its own message is on disk."""
    replies = replies_to(holding_relay, b"EHLO c.example\r\n" + TRANSACTION * 3 + b"QUIT\r\n")
    assert [r[:3] for r in replies] == [b"250"] + [b"250", b"250", b"354", b"250"] * 3 + [b"221"]
    ids = {r.rsplit(b" ", 1)[1].decode() for r in replies if b"queued as" in r}
    assert len(ids) == 3
    wait_for(lambda: set(holding_relay.queued()) == ids, what="three entries")

"""Bad input and faults from docs/RELIABILITY-PLAN.md: the relay refuses them cleanly or
keeps the mail."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from conftest import RelayProcess, in_data, relay_config, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from upstream import Upstream


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    return make_relay(relay_config(tmp_path, None, None))


def session(relay: RelayProcess, payload: bytes) -> bytes:
    """Send raw bytes (ending in QUIT) after the greeting; return all the relay said, up to
    its 221 or its closing the connection. (No half-close: the relay takes EOF as a drop.)"""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(payload)
        said = b""
        while (line := reader.readline()) and not line.startswith(b"221 "):
            said += line
        return said + line


@pytest.mark.plan(18, 100)
def test_smuggled_end_of_data_sequences_stay_inside_one_message(relay: RelayProcess,
                                                                upstream: Upstream) -> None:
    """Plan #18/#100: <LF>.<CR><LF>, <LF>.<LF> and <CR>.<CR><LF> do not end DATA; the
    upstream sees one transaction with those lines as body, never a second sender."""
    smuggled = (b"Subject: one\r\n\r\nbefore\n.\r\nMAIL FROM:<evil@example.com>\r\n"
                b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\n.\n"
                b"also\r.\r\nend\r\n")
    reply = session(relay, b"EHLO c.example\r\nMAIL FROM:<app@example.com>\r\n"
                    b"RCPT TO:<user@example.com>\r\nDATA\r\n" + smuggled + b".\r\nQUIT\r\n")
    assert reply.count(b"250 2.0.0 Ok: queued as") == 1
    [got] = wait_for(upstream.messages, what="the delivery")
    assert got.sender == "app@example.com" and got.recipients == ("user@example.com",)
    assert b"MAIL FROM:<evil@example.com>" in got.data  # as body text, nothing more
    assert upstream.delivered_to("victim@example.com") == []


@pytest.mark.plan(9)
def test_line_longer_than_1000_octets_is_refused_and_nothing_spooled(
        holding_relay: RelayProcess) -> None:
    """Plan #9: a 2000-byte DATA line gets 500 5.5.2 after the dot; nothing is stored."""
    reply = session(holding_relay, b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<u@example.com>\r\nDATA\r\nSubject: long\r\n\r\n"
                    + b"x" * 2000 + b"\r\n.\r\nQUIT\r\n")
    assert b"500 5.5.2 Error: line too long" in reply
    assert holding_relay.queued() == [] and holding_relay.debris() == []


@pytest.mark.plan(8)
def test_command_line_longer_than_512_octets_is_refused(holding_relay: RelayProcess) -> None:
    """Plan #8: an overlong command gets 500 and the session goes on."""
    reply = session(holding_relay, b"EHLO c.example\r\nMAIL FROM:<" + b"a" * 600
                    + b"@example.com>\r\nNOOP\r\nQUIT\r\n")
    assert b"500 5.5.2 Command line too long" in reply
    assert reply.rstrip().endswith(b"221 2.0.0 Bye")


@pytest.mark.plan(26)
def test_client_vanishing_mid_data_leaves_nothing(holding_relay: RelayProcess) -> None:
    """Plan #26: the client closes halfway through DATA: nothing committed, no debris."""
    with in_data(holding_relay.port) as (sock, _):
        sock.sendall(b"Subject: half\r\n\r\nhalf a bo")
    entry_id = holding_relay.send("app@example.com", ["user@example.com"],
                                  b"Subject: ok\r\n\r\nx\r\n")
    # Once deferred, its state record is written: tmp/ must then hold nothing at all.
    wait_for(lambda: holding_relay.files("deferred") == [entry_id], what="the one entry")
    assert holding_relay.queued() == [entry_id] and holding_relay.debris() == []


@pytest.mark.plan(22)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=8))
def test_garbage_commands_get_errors_never_tracebacks(holding_relay: RelayProcess,
                                                      lines: list[bytes]) -> None:
    """Plan #22 (fuzz, bounded): random bytes as commands get 5xx replies; no exception
    text reaches the client and the relay keeps serving."""
    payload = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in lines) + b"QUIT\r\n"
    reply = session(holding_relay, payload)
    assert b"Error: (" not in reply and b"Traceback" not in reply
    assert holding_relay.process is not None and holding_relay.process.poll() is None


@pytest.mark.plan(50)
def test_silent_upstream_times_out_and_the_entry_is_deferred(tmp_path: Path, make_relay) -> None:
    """Plan #50: an upstream that accepts TCP but never greets: timeout, deferred, no loss."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        config = relay_config(tmp_path, None, None)
        config["upstream"] = {"host": "127.0.0.1", "port": server.getsockname()[1],
                              "tls": "none", "timeout": "1s", "connections": 1}
        relay = make_relay(config)
        entry_id = relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
        wait_for(lambda: entry_id in relay.files("deferred"), what="the deferral")
        show = relay.cli("queue", "show", entry_id)
        assert "timed out" in show.stdout
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.plan(41)
def test_corrupt_entries_found_at_start_are_moved_aside_and_others_delivered(
        tmp_path: Path, make_relay, upstream: Upstream, ca_file: Path) -> None:
    """Plan #41: garbage, empty and truncated entries go to corrupt/; good mail flows."""
    config = relay_config(tmp_path, upstream, ca_file)
    first = make_relay(relay_config(tmp_path, None, None))
    good = first.send("app@example.com", ["user@example.com"], b"Subject: ok\r\n\r\nx\r\n")
    first.stop()
    spool = Path(config["spool"]["path"])
    deferred = spool / "deferred"
    (deferred / "0000000000000BADBAD01").write_bytes(b"\x00garbage")
    (deferred / "0000000000000BADBAD02").write_bytes(b"")
    whole = (deferred / good).read_bytes()
    (deferred / "0000000000000BADBAD03").write_bytes(whole[: len(whole) // 2])
    relay = make_relay(config)
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="the good message")
    wait_for(lambda: len(relay.files("corrupt")) == 3, what="three corrupt entries")
    wait_for(lambda: relay.log().count("status=corrupt") == 3, what="each reported once")
    assert relay.process is not None and relay.process.poll() is None


def test_upstream_closing_an_idle_reused_session_is_survived(relay: RelayProcess,
                                                             upstream: Upstream) -> None:
    """A cached session the upstream has dropped is noticed at RSET and replaced."""
    relay.send("app@example.com", ["first@example.com"], b"Subject: 1\r\n\r\nx\r\n")
    wait_for(lambda: upstream.delivered_to("first@example.com"), what="the first message")
    upstream.stop()   # closes every session, as a provider does with idle connections
    upstream.start()
    relay.send("app@example.com", ["second@example.com"], b"Subject: 2\r\n\r\nx\r\n")
    wait_for(lambda: upstream.delivered_to("second@example.com"), what="the second message")



@pytest.mark.plan(6)
def test_noop_slowloris_is_cut_off(holding_relay: RelayProcess) -> None:
    """NOOPs keep resetting the idle timer; after 20 commands without mail (EHLO counts)
    the session is closed."""
    reply = session(holding_relay, b"EHLO c.example\r\n" + b"NOOP\r\n" * 25)
    assert reply.count(b"250 ") == 20  # EHLO's last line and 19 NOOPs
    assert reply.endswith(b"421 4.7.0 Error: too many commands without mail\r\n")


@pytest.mark.plan(10)
def test_endless_line_in_data_is_refused_with_bounded_memory(holding_relay: RelayProcess) -> None:
    """32 MiB without a line break after 354: refused, nothing stored, memory bounded."""
    with in_data(holding_relay.port, timeout=30) as (sock, reader):
        chunk = b"\0" * (1024 * 1024)
        try:
            for _ in range(32):
                sock.sendall(chunk)
            sock.sendall(b"\r\n.\r\n")
            reply = reader.readline()
        except OSError:
            reply = b""
    assert not reply.startswith(b"250")
    assert holding_relay.process is not None and holding_relay.process.poll() is None
    assert holding_relay.rss_kib() < 200 * 1024
    assert holding_relay.queued() == [] and holding_relay.debris() == []


@pytest.mark.plan(21)
def test_whole_session_sent_before_the_greeting_is_processed_in_order(
        holding_relay: RelayProcess) -> None:
    """An early talker: everything, body and QUIT included, written before reading 220.
    Each command gets its own reply in order; exactly one message is stored."""
    with socket.create_connection(("127.0.0.1", holding_relay.port), timeout=10) as sock:
        sock.sendall(b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<u@example.com>\r\n"
                     b"DATA\r\nSubject: early\r\n\r\nMAIL FROM:<evil@example.com>\r\n.\r\n"
                     b"QUIT\r\n")
        replies = [line for line in sock.makefile("rb") if line[3:4] == b" "]
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    wait_for(lambda: len(holding_relay.queued()) == 1, what="the one message")
    [entry_id] = holding_relay.queued()
    shown = holding_relay.cli("queue", "show", entry_id, "--body").stdout
    assert "MAIL FROM:<evil@example.com>" in shown  # body text, never a command

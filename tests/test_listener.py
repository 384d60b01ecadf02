"""The SMTP listener of a real relay process: extensions, limits, validation, refusals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Session
from conftest import RelayProcess, in_data, relay_config, wait_for
from test_writer import slow_directory_fsyncs

from relay.addresses import rules_for
from relay.config import AddressesConfig, Config
from relay.entry import Queue
from relay.hostname import system_name
from relay.listener import Admission, Handler
from relay.metrics import Recorder
from relay.smtp_server import RelayEnvelope
from relay.spool import Spool
from relay.writer import SpoolWriter

BODY = b"Subject: t\r\n\r\nbody\r\n"


@pytest.fixture
def holding_relay(make_relay, tmp_path: Path) -> RelayProcess:
    """A relay without upstream: whatever it accepts stays in its spool for inspection."""
    return make_relay(relay_config(tmp_path, None, None))


def raw_session(relay: RelayProcess, payload: bytes, replies: int) -> list[bytes]:
    """Send raw bytes at once (pipelined) and read `replies` reply lines (final lines only)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        assert greeting.startswith(b"220 ")
        sock.sendall(payload)
        lines: list[bytes] = []
        while len(lines) < replies:
            line = reader.readline()
            assert line, f"connection closed after {lines}"
            if line[3:4] == b" ":
                lines.append(line.rstrip(b"\r\n"))
        return lines


@pytest.mark.plan(106)
def test_ehlo_advertises_the_contracts_extensions(holding_relay: RelayProcess) -> None:
    """SIZE, 8BITMIME, SMTPUTF8, PIPELINING, ENHANCEDSTATUSCODES; no version in the banner."""
    with holding_relay.client() as smtp:
        _, banner = smtp.connect("127.0.0.1", holding_relay.port)
        assert b"aiosmtpd" not in banner and b"Python" not in banner
        smtp.ehlo()
        for extension in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
            assert smtp.has_extn(extension), extension
        assert smtp.esmtp_features["size"] == str(25 * 1024 * 1024)


@pytest.mark.plan(1)
def test_listens_on_loopback_only_by_default(holding_relay: RelayProcess) -> None:
    """The built-in listen address is 127.0.0.1."""
    assert "listening=127.0.0.1:" in holding_relay.log()


@pytest.mark.plan(14)
@pytest.mark.parametrize("sender, fragment", [
    ("a..b@example.com", "bad sender address syntax"),
    ("a@b@c.example", "malformed address"),  # aiosmtpd's path parser refuses it
    ("<a@example.com", "malformed address"),  # a bracket inside the path
    ("x" * 65 + "@example.com", "local part longer than 64"),
    ("a\rb@x.example", "bad sender address syntax"),
])
def test_invalid_sender_gets_553_5_1_3_with_the_reason(holding_relay: RelayProcess,
                                                       sender: str, fragment: str) -> None:
    with socket.create_connection(("127.0.0.1", holding_relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO client.example\r\n")
        while reader.readline()[3:4] != b" ":
            pass
        sock.sendall(f"MAIL FROM:<{sender}>\r\n".encode())
        reply = reader.readline().decode()
    assert reply.startswith("553 5.1.3 "), reply
    assert fragment in reply


@pytest.mark.plan(14)
def test_invalid_recipient_gets_553_and_valid_ones_still_queue(holding_relay: RelayProcess) -> None:
    """A bad RCPT is refused alone; the transaction goes on with the good recipients."""
    with holding_relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        code, reply = smtp.rcpt("a..b@example.com")
        assert code == 553 and reply.startswith(b"5.1.3 Error: bad recipient address syntax")
        assert smtp.rcpt("ok@example.com")[0] == 250
        assert smtp.data(BODY)[0] == 250
    wait_for(lambda: len(holding_relay.queued()) == 1, what="one queued entry")


@pytest.mark.plan(16)
def test_internationalized_address_needs_smtputf8(holding_relay: RelayProcess) -> None:
    """A non-ASCII address is refused without SMTPUTF8 and accepted with it."""
    replies = raw_session(holding_relay, "EHLO c.example\r\nMAIL FROM:<app@example.com>\r\n"
                          "RCPT TO:<j\u00fcrgen@example.com>\r\nRSET\r\n"
                          "MAIL FROM:<app@example.com> SMTPUTF8\r\n"
                          "RCPT TO:<j\u00fcrgen@example.com>\r\n".encode(), 6)
    assert replies[2].startswith(b"553 5.1.3") and b"SMTPUTF8" in replies[2]
    assert replies[5].startswith(b"250 ")


@pytest.mark.plan(11)
def test_declared_size_above_the_limit_is_refused_at_mail(make_relay, tmp_path: Path) -> None:
    """MAIL ... SIZE= above max_message_size: 552 5.3.4 before any data is sent."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"max_message_size": "10KiB"}))
    replies = raw_session(relay, b"EHLO c.example\r\nMAIL FROM:<a@example.com> SIZE=20000\r\n", 2)
    assert replies[1].startswith(b"552 5.3.4 ")


@pytest.mark.plan(12)
def test_oversized_data_is_refused_and_nothing_spooled(make_relay, tmp_path: Path) -> None:
    """More data than max_message_size: 552 5.3.4 after the dot, nothing spooled."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"max_message_size": "10KiB"}))
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        smtp.rcpt("user@example.com")
        code, reply = smtp.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 +
                                (b"y" * 78 + b"\r\n") * 200)
    assert (code, reply[:5]) == (552, b"5.3.4")
    assert relay.queued() == [] and relay.debris() == []


@pytest.mark.plan(13)
def test_recipient_limit_gets_452_4_5_3_and_the_rest_are_queued(make_relay,
                                                                tmp_path: Path) -> None:
    """RCPT beyond max_recipients: 452 4.5.3; the accepted recipients are all queued."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"max_recipients": 3}))
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        codes = [smtp.rcpt(f"u{n}@example.com") for n in range(4)]
        assert [c for c, _ in codes] == [250, 250, 250, 452]
        assert codes[3][1].startswith(b"4.5.3")
        assert smtp.data(BODY)[0] == 250
    [entry_id] = wait_for(lambda: relay.files("deferred"), what="the deferred entry")
    header = (relay.spool / "deferred" / entry_id).read_bytes().split(b"\n")[1]
    assert b'"recipients":["u0@example.com","u1@example.com","u2@example.com"]' in header


@pytest.mark.plan(4)
def test_connection_limit_answers_421_and_frees_up(make_relay, tmp_path: Path) -> None:
    """Beyond max_connections: 421 4.7.0 and close; a freed slot is usable again."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"max_connections": 2}))
    first, second = relay.client(), relay.client()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as third:
        assert third.makefile("rb").readline().startswith(b"421 4.7.0 ")
    first.quit()

    def admitted() -> bool:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            return sock.makefile("rb").readline().startswith(b"220 ")
    wait_for(admitted, what="a freed connection slot")
    second.quit()


@pytest.mark.plan(3)
def test_client_outside_allow_networks_gets_554(make_relay, tmp_path: Path) -> None:
    """A client whose address is not in listen.allow: 554 5.7.1 at connect."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"allow": ["10.0.0.0/8"]}))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        assert sock.makefile("rb").readline().startswith(b"554 5.7.1 ")


@pytest.mark.plan(5)
def test_idle_client_gets_421_and_is_closed(make_relay, tmp_path: Path) -> None:
    """A client silent for listen.timeout gets 421 4.4.2 and the connection closes."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"timeout": "1s"}))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        assert reader.readline().startswith(b"421 4.4.2 ")
        assert reader.readline() == b""


@pytest.mark.plan(30)
def test_low_disk_space_gets_452_4_3_1(make_relay, tmp_path: Path) -> None:
    """Free space below spool.min_free: 452 4.3.1 and nothing written."""
    relay = make_relay(relay_config(tmp_path, None, None, spool={"min_free": "1000000GiB"}))
    with relay.client() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("app@example.com")
    assert (code, reply[:5]) == (452, b"4.3.1")
    assert relay.queued() == []


@pytest.mark.plan(38)
def test_spool_write_failure_gets_451_and_the_listener_keeps_serving(
        holding_relay: RelayProcess) -> None:
    """The spool cannot publish (incoming/ unusable): 452 4.3.1, no debris; then recovers."""
    incoming = holding_relay.spool / "incoming"
    shutil.rmtree(incoming)
    incoming.write_text("not a directory")
    with holding_relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        smtp.rcpt("user@example.com")
        code, reply = smtp.data(BODY)
    assert (code, reply[:5]) == (452, b"4.3.1")
    assert holding_relay.debris() == []
    incoming.unlink()
    incoming.mkdir(mode=0o700)
    assert holding_relay.send("app@example.com", ["user@example.com"], BODY)


@pytest.mark.plan(24, 105)
def test_helo_with_control_characters_cannot_inject_headers(holding_relay: RelayProcess) -> None:
    """EHLO 'evil\\rBcc: ...' is sanitized in Received:; no Bcc header appears."""
    replies = raw_session(holding_relay, b"EHLO evil\rBcc: victim@example.com\r\n"
                          b"MAIL FROM:<a@example.com>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
                          b"Subject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n", 6)
    assert replies[4].startswith(b"250 2.0.0 Ok: queued as ")
    [entry_id] = wait_for(lambda: holding_relay.files("deferred"), what="the deferred entry")
    data = (holding_relay.spool / "deferred" / entry_id).read_bytes()
    message = data.split(b"\n", 2)[2]
    assert b"\rBcc" not in message and b"\nBcc" not in message
    assert message.startswith(b"Received: from evil?Bcc:?victim@example.com ([127.0.0.1])\r\n")


@pytest.mark.plan(27)
def test_pipelined_transactions_with_rset_queue_independently(holding_relay: RelayProcess) -> None:
    """Three pipelined transactions, one reset midway: exactly two entries queued."""
    payload = (b"EHLO c.example\r\n"
               b"MAIL FROM:<a@example.com>\r\nRCPT TO:<u1@example.com>\r\nDATA\r\n"
               b"Subject: 1\r\n\r\none\r\n.\r\n"
               b"MAIL FROM:<a@example.com>\r\nRCPT TO:<u2@example.com>\r\nRSET\r\n"
               b"MAIL FROM:<a@example.com>\r\nRCPT TO:<u3@example.com>\r\nDATA\r\n"
               b"Subject: 3\r\n\r\nthree\r\n.\r\nQUIT\r\n")
    replies = raw_session(holding_relay, payload, 13)
    assert sum(r.startswith(b"250 2.0.0 Ok: queued") for r in replies) == 2
    wait_for(lambda: len(holding_relay.queued()) == 2, what="two entries")


@pytest.mark.plan(95)
def test_spool_files_are_private(holding_relay: RelayProcess) -> None:
    """Entries 0600, spool directories 0700."""
    entry_id = holding_relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: holding_relay.files("deferred"), what="deferral")
    assert os.stat(holding_relay.spool / "deferred" / entry_id).st_mode & 0o777 == 0o600
    assert os.stat(holding_relay.spool / "deferred").st_mode & 0o777 == 0o700


@pytest.mark.plan(42)
def test_second_relay_on_the_same_spool_is_refused(holding_relay: RelayProcess,
                                                   tmp_path: Path) -> None:
    """The spool lock keeps a second `relay serve` out (exit 69, clear message)."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--config",
                             str(holding_relay.config_path)], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 69
    assert "another relay is serving the spool" in result.stderr


def test_smtplib_sendmail_round_trip_is_fast(holding_relay: RelayProcess) -> None:
    """The answer is 250 with a queue ID; the message is on disk when the client hears it."""
    with holding_relay.client() as smtp:
        refused = smtp.sendmail("app@example.com", ["user@example.com"], BODY)
    assert refused == {}
    assert holding_relay.queued()  # on disk the moment 250 was heard
    with pytest.raises(smtplib.SMTPRecipientsRefused), holding_relay.client() as smtp:
        smtp.sendmail("app@example.com", ["bad address"], BODY)


def non_loopback_address() -> str | None:
    """An address of this host other than loopback, found without sending anything."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: a route lookup, no packet
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.plan(1)
def test_default_listener_is_unreachable_from_other_addresses(holding_relay: RelayProcess) -> None:
    """Bound to 127.0.0.1 only: the same port on the host's other address refuses."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to probe from")
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    ours = [line.split()[1] for line in listening
            if line.split()[1].endswith(f":{holding_relay.port:04X}") and line.split()[3] == "0A"]
    assert ours == [f"0100007F:{holding_relay.port:04X}"]  # 127.0.0.1, LISTEN
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, holding_relay.port), timeout=5)


@pytest.mark.plan(7)
def test_trickled_data_is_cut_off_at_the_timeout_and_nothing_is_kept(make_relay,
                                                                     tmp_path: Path) -> None:
    """A client that sends a line every half second, for longer than listen.timeout: the
    session ends without 250 and nothing is stored."""
    relay = make_relay(relay_config(tmp_path, None, None, listen={"timeout": "1s"}))
    with in_data(relay.port) as (sock, reader):
        said = b""
        try:
            for n in range(8):  # 4 s of trickle against a 1 s timeout
                sock.sendall(b"line %d\r\n" % n)
                time.sleep(0.5)  # the trickle itself, not a wait for the relay
            sock.sendall(b".\r\n")
            said = reader.readline()
        except OSError:
            pass
    assert not said.startswith(b"250")
    assert relay.queued() == [] and relay.debris() == []


@pytest.mark.plan(23)
def test_exception_in_the_data_handler_answers_451_and_is_logged_once(make_relay,
                                                                      tmp_path: Path) -> None:
    """An exception of ours while storing: 451 4.3.0 with no path or exception text, the
    session goes on, one log line with the traceback, nothing stored."""
    relay = make_relay(relay_config(tmp_path, None, None),
                       env={"RELAY_RAISE_AT": "before-spool-write"})
    with in_data(relay.port) as (sock, reader):
        sock.sendall(b"Subject: boom\r\n\r\nbody\r\n.\r\n")
        reply = reader.readline()
        sock.sendall(b"NOOP\r\n")
        still_serving = reader.readline()
    assert reply.startswith(b"451 4.3.0 ")
    assert b"/" not in reply and b"Injected" not in reply and b"Error: (" not in reply
    assert still_serving.startswith(b"250")
    wait_for(lambda: "InjectedFault" in relay.log(), what="the error in the log")
    assert sum("SMTP session error" in line for line in relay.lines) == 1
    assert relay.queued() == [] and relay.debris() == []


@pytest.mark.plan(77)
def test_sigterm_mid_data_closes_the_listener_and_never_says_250_without_the_message(
        make_relay, tmp_path: Path) -> None:
    """SIGTERM halfway through a body: new connections are refused at once; the client
    in DATA hears 250 only if its message is stored (here or after exit), else nothing
    is stored; exit 0."""
    relay = make_relay(relay_config(tmp_path, None, None))
    with in_data(relay.port) as (sock, reader):
        sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        assert relay.process is not None
        relay.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()
            except (ConnectionRefusedError, ConnectionResetError):
                # A reset: the attempt reached the backlog as the listener closed.
                return True
            return False
        wait_for(refused, what="the listener to close")
        try:
            sock.sendall(b"second half\r\n.\r\n")
            reply = reader.readline()
        except OSError:
            reply = b""
    assert relay.process.wait(timeout=30) == 0
    stored = relay.files("incoming") + relay.files("deferred")
    if reply.startswith(b"250"):
        assert len(stored) == 1
    else:
        assert stored == [] and relay.debris() == []


@pytest.mark.plan(3, 90)
def test_probe_from_an_address_outside_the_allow_list_relays_nothing(
        make_relay, tmp_path: Path, upstream, ca_file: Path) -> None:
    """An open-relay probe from another address (127.0.0.2, outside listen.allow): refused
    at the greeting, and whatever it sends next is neither queued nor relayed."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file,
                                    listen={"allow": ["127.0.0.1/32"]}))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"554 5.7.1 ")
        try:
            sock.sendall(b"EHLO probe.example\r\nMAIL FROM:<spam@example.net>\r\n"
                         b"RCPT TO:<victim@example.org>\r\nDATA\r\nSubject: spam\r\n\r\nx\r\n"
                         b".\r\nQUIT\r\n")
            rest = reader.read()
        except OSError:
            rest = b""
    assert b"250" not in rest and b"354" not in rest
    # A client that is allowed still gets through: the same relay delivers its mail.
    relay.send("app@example.com", ["user@example.com"], BODY)
    wait_for(lambda: upstream.delivered_to("user@example.com"), what="the allowed client's mail")
    assert [t.recipients for t in upstream.messages()] == [("user@example.com",)]


def test_a_large_message_goes_to_its_spool_file_as_it_arrives(holding_relay: RelayProcess) -> None:
    """Past SPILL_BYTES the content is written to its file in tmp/ while DATA still comes
    (memory does not grow with message size); the entry then holds it byte for byte."""
    body = b"Subject: big\r\nMessage-ID: <big@example.com>\r\n\r\n" + \
        (b"x" * 998 + b"\r\n") * 3000 + b"..dotted\r\n"

    def spilled() -> int:
        sizes = [os.stat(holding_relay.spool / "tmp" / name).st_size
                 for name in holding_relay.debris()]
        return max(sizes, default=0) > 2_000_000
    with in_data(holding_relay.port) as (sock, reader):
        sock.sendall(body)
        wait_for(spilled, what="the content on disk before the end of data")
        sock.sendall(b".\r\n")
        reply = reader.readline()
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    entry_id = reply.split()[-1].decode()
    [stored] = wait_for(lambda: holding_relay.files("deferred"), what="the entry")
    data = (holding_relay.spool / "deferred" / stored).read_bytes()
    head, content = data.split(b"\n", 2)[1:]
    assert json.loads(head)["size"] == len(content) and stored == entry_id
    received, message = content.split(b"\r\nSubject: big", 1)
    assert received.startswith(b"Received: from c.example")
    assert b"Subject: big" + message == body.replace(b"\r\n..dotted", b"\r\n.dotted")


@pytest.mark.parametrize("when", ["while storing", "once stored"])
def test_a_session_ended_around_its_store_still_hands_the_entry_over_once(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The client hangs up after its final dot: its session is cancelled while the store
    waits for the disk, or in the step after the store's result came. Either way the
    entry, durable, is handed to delivery once (else it would wait for a restart)."""
    syncs = slow_directory_fsyncs(monkeypatch)
    handed: list[str] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        writer = SpoolWriter(spool)
        writer.start()
        rules = rules_for(AddressesConfig(hostname="relay.example"), system_name())
        handler = Handler(spool, writer, Config(), Admission((), 1),
                          lambda entry, parts: handed.append(entry.id), rules, Recorder())
        session = Session(loop)
        session.peer, session.host_name = ("127.0.0.1", 25000), "client.example"
        envelope = RelayEnvelope()
        envelope.mail_from, envelope.rcpt_tos = "a@example.com", ["u@example.com"]
        sink = handler.begin_message(session, envelope)
        sink.write(b"Subject: x\r\n\r\nbody\r\n")
        task = asyncio.create_task(handler.end_message(session, envelope, sink))
        if when == "once stored":
            answer = handler._stored_reply

            def cancel_before_the_session_resumes(*args: Any) -> Any:
                loop.call_soon(task.cancel)
                return answer(*args)
            monkeypatch.setattr(handler, "_stored_reply", cancel_before_the_session_resumes)
        else:
            while not syncs:
                await asyncio.sleep(0.005)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = loop.time() + 10
        while not handed and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # a second hand-over would come in this time
        await writer.close()
    asyncio.run(asyncio.wait_for(run(), 30))
    assert handed == spool.queue_ids(Queue.INCOMING) and len(handed) == 1

"""A hostile local process against the listener and the spool: each finding of the review,
with the exact bytes that show it. Each test failed on the build the review attacked and
passes since its fix (docs/RELIABILITY-PLAN.md, rows 107-119).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from conftest import MakeRelay, RelayProcess, relay_config, wait_for
from test_disk_full import tmpfs_works
from upstream import Upstream

from relay.entry import NewEntry
from relay.errors import SpoolError
from relay.spool import Spool

ENVELOPE = b"EHLO app.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<%s>\r\nDATA\r\n"
# 600 nested comments: email.utils.getaddresses, which reads every From: field for the
# address rules, raises RecursionError on it (its comment parser recurses per level).
DEEP_FROM = b"From: " + b"(" * 600 + b"\r\n"
# A Message-ID folded over 349,000 continuation lines of one space: about 1 MB, under
# max_message_size and under the spill point, so it is sealed in one piece.
FOLDED = b" \r\n" * 349_000


@pytest.fixture
def holding_relay(make_relay: MakeRelay, tmp_path: Path) -> RelayProcess:
    """A relay without upstream: whatever it accepts stays in its spool for inspection."""
    return make_relay(relay_config(tmp_path, None, None))


def session(relay: RelayProcess, timeout: float = 30) -> tuple[socket.socket, BinaryIO]:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=timeout)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    return sock, reader


def until_354(reader: BinaryIO) -> None:
    while not (line := reader.readline()).startswith(b"354"):
        assert line[:1] == b"2", line


def final_replies(reader: BinaryIO) -> list[bytes]:
    """Every final reply line until the relay closes the connection."""
    return [line.rstrip(b"\r\n") for line in reader if line[3:4] == b" "]


def envelopes(relay: RelayProcess) -> list[dict[str, Any]]:
    """The JSON envelope of every entry the relay kept (it has no upstream)."""
    found = []
    for queue in ("incoming", "active", "deferred", "scheduled"):
        for name in relay.files(queue):
            found.append(json.loads((relay.spool / queue / name).read_bytes().split(b"\n")[1]))
    return found


# --- 1. an error while sealing a message desynchronises the session ----------------------

@pytest.mark.plan(118)
def test_a_from_field_nested_past_the_parsers_depth_is_queued(
        holding_relay: RelayProcess) -> None:
    """A From: the address rules cannot parse is kept as it is (README: Addresses)."""
    sock, reader = session(holding_relay)
    with sock, reader:
        sock.sendall(ENVELOPE % b"u@example.com")
        until_354(reader)
        sock.sendall(DEEP_FROM + b"Subject: deep\r\n\r\nbody\r\n.\r\n")
        assert reader.readline().startswith(b"250 2.0.0 Ok: queued as ")


@pytest.mark.plan(118)
def test_the_rest_of_a_message_refused_mid_data_is_never_read_as_commands(
        holding_relay: RelayProcess) -> None:
    """A message past the 1 MiB spill point whose seal fails: what follows in its body
    (here a RCPT, a DATA and a whole message) stays content and is never executed."""
    smuggled = (b"a.\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                b"From: ceo@bank.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n.\r\n")
    sock, reader = session(holding_relay)
    with sock, reader:
        sock.sendall(ENVELOPE % b"customer@example.com")
        until_354(reader)
        sock.sendall(DEEP_FROM + b"Subject: contact form\r\n\r\n"
                     + (b"x" * 998 + b"\r\n") * 1100 + smuggled
                     + b"rest of the message\r\n.\r\nQUIT\r\n")
        replies = final_replies(reader)
    assert sum(r.startswith(b"354") for r in replies) == 0, replies
    assert not any("victim@example.org" in e["recipients"] for e in envelopes(holding_relay))


@pytest.mark.plan(118)
def test_a_message_refused_at_its_final_dot_leaves_no_recipient_behind(
        holding_relay: RelayProcess) -> None:
    """The next transaction after a failed DATA goes to its own recipients only."""
    sock, reader = session(holding_relay)
    with sock, reader:
        sock.sendall(ENVELOPE % b"alice@example.com" + DEEP_FROM + b"\r\nfor alice\r\n.\r\n"
                     + b"MAIL FROM:<app@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                     + b"Subject: for bob only\r\n\r\nprivate\r\n.\r\nQUIT\r\n")
        final_replies(reader)
    for envelope in envelopes(holding_relay):
        if "bob@example.com" in envelope["recipients"]:
            assert envelope["recipients"] == ["bob@example.com"]


# --- 2. folded header fields cost quadratic time on the event loop -----------------------

@pytest.mark.plan(118)
@pytest.mark.parametrize("field", [b"Message-ID: <a@b>", b"X-Relay-Send-At: 2020-01-01T00:00:00Z"])
def test_a_long_folded_header_field_does_not_stop_other_sessions(
        holding_relay: RelayProcess, field: bytes) -> None:
    """While a message with one field folded over 349,000 lines is sealed, new clients
    are still greeted within 5 s (the relay stopped for 36-40 s: past WatchdogSec=30s)."""
    sock, reader = session(holding_relay, timeout=120)
    with sock, reader:
        sock.sendall(ENVELOPE % b"u@example.com")
        until_354(reader)
        sock.sendall(field + b"\r\n" + FOLDED + b"\r\nbody\r\n.\r\n")
        while not select.select([sock], [], [], 0.05)[0]:
            probe, greeting = session(holding_relay, timeout=5)
            probe.close()
            greeting.close()
        assert reader.readline().startswith(b"250 2.0.0 Ok: queued")


# --- 3. a client's EOF cancels the session while its message is stored -------------------

@pytest.mark.plan(118)
def test_a_client_that_half_closes_after_quit_hears_every_reply(
        holding_relay: RelayProcess) -> None:
    """`printf '...QUIT\\r\\n' | nc`: the whole session in one write, then FIN. The message
    is stored either way; the client must hear its 250 (and the log must say queued)."""
    sock, reader = session(holding_relay)
    with sock, reader:
        sock.sendall(ENVELOPE % b"u@example.com")
        until_354(reader)
        sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        replies = final_replies(reader)
    assert [r[:3] for r in replies] == [b"250", b"221"], replies
    wait_for(lambda: any("status=queued" in line for line in holding_relay.lines),
             what="the queued log line")


@pytest.mark.plan(118)
def test_a_scheduled_message_stored_as_its_client_left_is_sent_at_its_time(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path) -> None:
    """HOLDFOR=1, and FIN right after the final dot: the entry the relay stored is sent
    once due, not left in scheduled/ until the next restart."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file))
    sock, reader = session(relay)
    with sock, reader:
        sock.sendall(b"EHLO app.example\r\nMAIL FROM:<app@example.com> HOLDFOR=1\r\n"
                     b"RCPT TO:<u@example.com>\r\nDATA\r\n")
        until_354(reader)
        sock.sendall(b"Subject: later\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        final_replies(reader)
    wait_for(lambda: relay.files("scheduled") or upstream.messages(), what="the entry")
    wait_for(upstream.messages, timeout=10, what="the scheduled message to be sent")


# --- 4. messages over 1 MiB are never held to spool.min_free -----------------------------

@pytest.mark.plan(118)
def test_a_message_past_the_spill_point_keeps_spool_min_free(
        make_relay: MakeRelay, tmp_path: Path) -> None:
    """16 MiB filesystem, min_free 8 MiB, a 10 MiB message without SIZE=: MAIL passes
    (16 MiB free), but storing it would leave 6 MiB, so it gets 452 4.3.1."""
    if not tmpfs_works(tmp_path):
        pytest.skip("this kernel refuses tmpfs mounts in an unprivileged user namespace")
    config = relay_config(tmp_path, None, None, spool={"min_free": "8MiB"})
    spool_dir = Path(config["spool"]["path"])
    spool_dir.mkdir()
    prefix = ["unshare", "-rm", "sh", "-c",
              'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@"', str(spool_dir)]
    relay = make_relay(config, prefix=prefix)
    assert relay.process is not None
    mounted = Path(f"/proc/{relay.process.pid}/root") / spool_dir.relative_to("/")
    sock, reader = session(relay)
    with sock, reader:
        sock.sendall(ENVELOPE % b"u@example.com")
        until_354(reader)
        sock.sendall(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 10_480 + b".\r\n")
        reply = reader.readline()
    stat = os.statvfs(mounted)
    assert reply.startswith(b"452 4.3.1"), reply
    assert stat.f_bavail * stat.f_frsize >= 8 * 1024 * 1024


# --- 5. the spool trusts directories it does not own --------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a directory to another user")
@pytest.mark.plan(119)
def test_a_spool_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A spool directory another local user created first (owner 65534): refused, since
    its owner could rename anything in it and plant symlinks for the relay to follow."""
    path = tmp_path / "spool"
    path.mkdir()
    os.chown(path, 65534, 65534)
    with pytest.raises(SpoolError):
        Spool(path).open()


@pytest.mark.plan(119)
def test_emptying_the_kept_files_never_follows_a_symlink(tmp_path: Path) -> None:
    """A delivered entry's kept file in tmp/ replaced by a symlink: emptying the kept
    files leaves the link's target as it was (it truncated it to 0 bytes)."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    entry = spool.store_many([NewEntry("0" * 21, "a@example.com", ("b@example.com",),
                                       (b"Subject: x\r\n\r\nbody\r\n",), 0.0, False)])[0]
    assert not isinstance(entry, Exception)
    spool.remove(entry)
    spare = tmp_path / "spool" / "tmp" / f"{entry.id}.spare"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    spare.unlink()
    spare.symlink_to(victim)
    spool.empty_spares()
    assert victim.read_bytes() == b"precious\n"


# --- 6. DATA of short dot-ended lines multiplies memory and CPU ---------------------------

def peak_rss_kib(relay: RelayProcess) -> int:
    assert relay.process is not None
    status = Path(f"/proc/{relay.process.pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1))


@pytest.mark.plan(118)
def test_dot_ended_lines_do_not_multiply_a_sessions_memory(
        holding_relay: RelayProcess) -> None:
    """Four sessions each holding 1,040,000 octets of `a.\\r\\n` lines (under the 1 MiB
    spill point): the relay's peak RSS grows by less than 24 MiB (it grew by about 14 MiB
    per session, and the lines took about 230 times the CPU of ordinary ones)."""
    before = peak_rss_kib(holding_relay)
    sessions = [session(holding_relay, timeout=120) for _ in range(4)]
    try:
        for sock, reader in sessions:
            sock.sendall(ENVELOPE % b"u@example.com")
            until_354(reader)
            sock.sendall(b"Subject: dots\r\n\r\n" + b"a.\r\n" * 260_000)
        for sock, _ in sessions:
            sock.sendall(b".\r\n")
        for _, reader in sessions:
            assert reader.readline().startswith(b"250 2.0.0 Ok: queued")
    finally:
        for sock, reader in sessions:
            reader.close()
            sock.close()
    assert peak_rss_kib(holding_relay) - before < 24 * 1024


# --- 7. a repeated SIZE= still reaches int() ----------------------------------------------

@pytest.mark.plan(118)
def test_a_repeated_size_parameter_gets_501(holding_relay: RelayProcess) -> None:
    """`SIZE=1 SIZE=²`: 501, never 451 with a traceback in the log."""
    sock, reader = session(holding_relay)
    with sock, reader:
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.com> SIZE=1 SIZE=\xc2\xb2\r\nQUIT\r\n")
        replies = final_replies(reader)
    assert replies[1][:3] == b"501", replies
    assert not any("Traceback" in line for line in holding_relay.lines)


# --- 8. header fields past the spill point escape the address rules ----------------------

@pytest.mark.plan(118)
def test_a_from_field_after_a_megabyte_of_header_is_still_rewritten(
        make_relay: MakeRelay, tmp_path: Path) -> None:
    """With sender_domains and default_sender, a From: outside them that follows 1.3 MB of
    other header fields is rewritten like any other, or the message is refused; it is
    never queued with the foreign From: (it was, and an X-Relay-Send-At there was kept)."""
    relay = make_relay(relay_config(tmp_path, None, None, addresses={
        "sender_domains": ["mg.example.com"], "default_sender": "noreply@mg.example.com"}))
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"p" * 900) for n in range(1400))
    sock, reader = session(relay)
    with sock, reader:
        sock.sendall(ENVELOPE % b"u@example.com")
        until_354(reader)
        sock.sendall(padding + b"From: ceo@bank.example\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
        reply = reader.readline()
    if reply.startswith(b"250"):
        entry_id = reply.split()[-1].decode()
        stored = [relay.spool / q / entry_id for q in ("incoming", "active", "deferred")]
        content = next(path.read_bytes() for path in stored if path.exists())
        assert b"From: ceo@bank.example" not in content


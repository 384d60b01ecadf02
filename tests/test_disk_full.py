"""A spool on a tiny real filesystem: docs/RELIABILITY-PLAN.md rows 30, 36 and 37.

The relay runs in its own mount namespace (`unshare -rm`, no privileges needed) with a
size- or inode-limited tmpfs over its spool directory; the test reads that spool through
/proc/<pid>/root.
"""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest
from conftest import RelayProcess, relay_config, wait_for

from relay.entry import Queue
from relay.spool import Spool


def tmpfs_works(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {probe}"],
                            capture_output=True, timeout=30)
    return result.returncode == 0


@pytest.fixture
def tiny_spool_relay(make_relay, tmp_path: Path):  # type: ignore[no-untyped-def]
    if not tmpfs_works(tmp_path):
        pytest.skip("this kernel refuses tmpfs mounts in an unprivileged user namespace")

    def make(mount_options: str) -> tuple[RelayProcess, Path]:
        config = relay_config(tmp_path, None, None,
                              listen={"max_message_size": "256KiB"})
        spool_dir = Path(config["spool"]["path"])
        spool_dir.mkdir()
        prefix = ["unshare", "-rm", "sh", "-c",
                  f'mount -t tmpfs -o {mount_options} tmpfs "$0" && exec "$@"', str(spool_dir)]
        relay = make_relay(config, prefix=prefix)
        assert relay.process is not None
        return relay, Path(f"/proc/{relay.process.pid}/root") / spool_dir.relative_to("/")
    return make


def send_without_size(relay: RelayProcess, body: bytes) -> tuple[int, bytes]:
    """One message with no SIZE= declared, so only the write itself can find the disk full."""
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.mail("app@example.com")
        smtp.rcpt("user@example.com")
        return smtp.data(body)


@pytest.mark.plan(30, 36)
def test_full_disk_refuses_with_452_and_keeps_what_it_accepted(tiny_spool_relay) -> None:  # type: ignore[no-untyped-def]
    """ENOSPC mid-write: 452 4.3.1, no partial entry; accepted mail intact; space freed,
    mail is accepted again."""
    relay, spool_path = tiny_spool_relay("size=1m")
    body = b"Subject: filler\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200  # ~200 KiB
    replies = [send_without_size(relay, body) for _ in range(8)]
    codes = [code for code, _ in replies]
    assert 250 in codes and 452 in codes, codes
    refused = [reply for code, reply in replies if code == 452]
    assert all(reply.startswith(b"4.3.1") for reply in refused)
    assert relay.process is not None and relay.process.poll() is None
    spool = Spool(spool_path)
    wait_for(lambda: not spool.queue_ids(Queue.ACTIVE), what="deliveries to settle")
    assert list((spool_path / "tmp").iterdir()) == []
    entries = list(spool.entries())
    assert len(entries) == codes.count(250)
    assert all(not isinstance(e, Exception) and e.size > 200_000 for e in entries)
    for entry in entries:  # free the space, as an operator would with relay queue delete
        spool.delete(entry.id)  # type: ignore[union-attr]
    assert send_without_size(relay, body)[0] == 250


@pytest.mark.plan(11, 30)
def test_declared_size_larger_than_free_space_is_refused_at_mail(tiny_spool_relay) -> None:  # type: ignore[no-untyped-def]
    """MAIL ... SIZE= more than the free space: 452 4.3.1 before any data is sent."""
    relay, _ = tiny_spool_relay("size=128k")
    with relay.client() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("app@example.com", options=["SIZE=200000"])
    assert (code, reply[:5]) == (452, b"4.3.1")


@pytest.mark.plan(37)
def test_inode_exhaustion_refuses_with_452(tiny_spool_relay) -> None:  # type: ignore[no-untyped-def]
    """No inode left for a new file: 452 4.3.1, the relay keeps serving."""
    relay, spool_path = tiny_spool_relay("size=64m,nr_inodes=16")
    codes = []
    for _ in range(10):
        try:
            codes.append(send_without_size(relay, b"Subject: small\r\n\r\nx\r\n")[0])
        except smtplib.SMTPException:
            codes.append(0)
    assert 452 in codes, codes
    assert 0 not in codes
    assert relay.process is not None and relay.process.poll() is None
    assert list((spool_path / "tmp").iterdir()) == []

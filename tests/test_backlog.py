"""A large backlog (docs/RELIABILITY-PLAN.md row 43): start-up and `relay queue` read directories
and small headers, never bodies, so 10,000 queued entries cost seconds, not minutes, and
the daemon's memory stays bounded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import relay_config, run_cli

from relay.entry import Queue
from relay.spool import Spool, new_id

BACKLOG = 10_000
BODY = b"Subject: backlog\r\n\r\n" + b"x" * 4000 + b"\r\n"  # a 4 KiB body, never read


def fill(spool_path: Path, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`count` deferred entries, due in an hour. Built through the spool's own code, with
    fsync skipped: durability of the fixture is not what this test is about."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    spool = Spool(spool_path)
    spool.open()
    due = time.time() + 3600
    for n in range(count):
        entry_id = new_id(time.time())
        spool.store(entry_id, "app@example.com", [f"user{n}@example.com"], [BODY],
                    time.time(), False)
        spool.move(entry_id, (Queue.INCOMING,), Queue.DEFERRED)
        os.utime(spool_path / "deferred" / entry_id, (due, due))
    monkeypatch.undo()


@pytest.mark.plan(43, 82)
def test_ten_thousand_queued_entries_start_list_and_stay_small(
        tmp_path: Path, make_relay, monkeypatch: pytest.MonkeyPatch,
        record_property) -> None:
    config = relay_config(tmp_path, None, None)
    fill(Path(config["spool"]["path"]), BACKLOG, monkeypatch)

    started = time.monotonic()
    relay = make_relay(config)
    start_seconds = time.monotonic() - started
    assert f"queued={BACKLOG}" in relay.log()

    started = time.monotonic()
    listing = run_cli(relay.client_config_path, "queue", "--json")
    list_seconds = time.monotonic() - started
    assert listing.returncode == 0, listing.stderr
    entries = json.loads(listing.stdout)
    assert len(entries) == BACKLOG and {e["state"] for e in entries} == {"deferred"}

    rss_mib = relay.rss_kib() / 1024
    seen = (f"start-up {start_seconds:.1f} s, queue --json {list_seconds:.1f} s, "
            f"daemon RSS {rss_mib:.0f} MiB with {BACKLOG} entries")
    record_property("seen", seen)
    # Budgets with a wide margin for a loaded CI machine (issue 7 sets 10 s and 5 s for
    # ten times as many entries).
    assert start_seconds < 10, seen
    assert list_seconds < 10, seen
    assert rss_mib < 150, seen

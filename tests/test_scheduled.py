"""Scheduled delivery end to end: sent at its time and not before, after a SIGKILL too;
released, rescheduled earlier and later by the operator; shown by `relay queue`.

Entries are stored scheduled through the spool's own API (the listener's ways in,
FUTURERELEASE and X-Relay-Send-At, are the listener's tests): in process through the
spool writer and Delivery.schedule_new, as the listener hands them over, or into the
spool of a relay process, whose daemon hears of them as an operator's would be heard of.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PASSWORD_ENV, RelayProcess, holds_for, relay_config, run_cli, wait_for
from upstream import PASSWORD, Upstream

from relay.config import parse_config
from relay.delivery import Delivery
from relay.entry import NewEntry, Queue
from relay.spool import Spool, new_id
from relay.writer import SpoolWriter

BODY = b"Subject: later\r\nMessage-ID: <later@example.com>\r\n\r\nSee you soon.\r\n"
ON_TIME = 1.5  # a second, plus the upstream's session set-up on a busy machine


def scheduled(send_at: float, recipient: str = "user@example.com") -> NewEntry:
    return NewEntry(new_id(time.time()), "app@example.com", (recipient,), (BODY,), time.time(),
                    False, send_at=send_at, message_id="<later@example.com>")


def store(spool_path: Path, send_at: float, wake: bool = False) -> str:
    """Store a scheduled entry into a relay's spool; with `wake`, tell its daemon."""
    spool = Spool(spool_path)
    [entry] = spool.store_many([scheduled(send_at)])
    assert not isinstance(entry, Exception)
    if wake:
        spool.wake(entry.id)
    return entry.id


def test_a_stored_scheduled_message_goes_out_at_its_time_not_before(
        tmp_path: Path, upstream: Upstream, ca_file: Path) -> None:
    """Handed to delivery as the listener hands it (schedule_new), it waits in scheduled/
    and reaches the upstream at its send time, within a second, and never before."""
    config = parse_config(yaml.safe_dump(relay_config(tmp_path, upstream, ca_file)),
                          {PASSWORD_ENV: PASSWORD})
    spool = Spool(config.spool.path)
    spool.open()

    async def main() -> float:
        writer = SpoolWriter(spool)
        writer.start()
        delivery = Delivery(spool, writer, config)
        delivery.start()
        send_at = time.time() + 1.5
        new = scheduled(send_at)
        entry = await writer.store(new)
        assert entry.queue is Queue.SCHEDULED
        delivery.schedule_new(entry, new.parts)
        while time.time() < send_at - 0.05:  # nothing arrives before its time
            assert upstream.messages() == [], "sent early"
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 10
        while not upstream.messages():
            assert time.monotonic() < deadline, "never sent"
            await asyncio.sleep(0.01)
        await delivery.stop(grace=5)
        await writer.close()
        return send_at
    send_at = asyncio.run(main())
    [got] = upstream.messages()
    assert got.data == BODY
    assert send_at <= got.at < send_at + ON_TIME


def test_sigkill_while_scheduled_then_sent_on_time_after_the_restart(
        tmp_path: Path, make_relay: Any, upstream: Upstream, ca_file: Path) -> None:
    """The daemon has the entry in its schedule; SIGKILL; the restarted relay finds it in
    scheduled/ and sends it at its time, not before."""
    config = relay_config(tmp_path, upstream, ca_file)
    relay = make_relay(config)
    send_at = time.time() + 5
    store(relay.spool, send_at, wake=True)
    wait_for(lambda: relay.files("wake") == [], what="the daemon to take the new time")
    relay.kill()
    restarted = make_relay(config)
    holds_for(lambda: upstream.messages() == [], send_at - time.time() - 0.05,
              what="nothing sent before the send time")
    [got] = wait_for(upstream.messages, timeout=10, what="the delivery")
    assert send_at <= got.at < send_at + ON_TIME
    wait_for(lambda: restarted.files("scheduled") == [], what="the entry to leave scheduled/")


def test_release_sends_a_scheduled_message_now(relay: RelayProcess, upstream: Upstream) -> None:
    """A message due in an hour, released, reaches the upstream at once."""
    entry_id = store(relay.spool, time.time() + 3600)
    result = relay.cli("queue", "release", entry_id)
    assert (result.returncode, result.stdout) == (0, f"{entry_id}: released\n")
    wait_for(upstream.messages, timeout=5, what="delivery after release")


def test_reschedule_to_an_earlier_time_sends_it_then_not_before(
        relay: RelayProcess, upstream: Upstream) -> None:
    """A message due in an hour, rescheduled to 3 s from now: the running daemon learns
    the new time (wake/) and sends it then."""
    entry_id = store(relay.spool, time.time() + 3600)
    result = relay.cli("queue", "reschedule", entry_id, "3s")
    assert result.returncode == 0 and result.stdout.startswith(f"{entry_id}: rescheduled for ")
    send_at = (relay.spool / "scheduled" / entry_id).stat().st_mtime
    assert send_at - time.time() < 3
    holds_for(lambda: upstream.messages() == [], send_at - time.time() - 0.05,
              what="nothing sent before the new time")
    [got] = wait_for(upstream.messages, timeout=10, what="the delivery")
    assert send_at <= got.at < send_at + ON_TIME


def test_reschedule_to_a_later_time_holds_it_past_the_old_one(
        relay: RelayProcess, upstream: Upstream) -> None:
    """The daemon expects the message in 2 s; moved to an hour ahead, it is still waiting
    well after the old time, in scheduled/ with its new time."""
    entry_id = store(relay.spool, time.time() + 2, wake=True)
    wait_for(lambda: relay.files("wake") == [], what="the daemon to take the first time")
    later = time.time() + 3600
    assert relay.cli("queue", "reschedule", entry_id, "1h").returncode == 0
    holds_for(lambda: upstream.messages() == [], 3.5, what="nothing sent at the old time")
    assert relay.files("scheduled") == [entry_id]
    assert (relay.spool / "scheduled" / entry_id).stat().st_mtime == pytest.approx(later, abs=5)


def test_reschedule_needs_a_time_or_a_duration(relay: RelayProcess) -> None:
    """An unreadable TIME|DURATION is a usage error (64); the entry stays put."""
    entry_id = store(relay.spool, time.time() + 3600)
    result = relay.cli("queue", "reschedule", entry_id, "whenever")
    assert result.returncode == 64 and "TIME|DURATION" in result.stderr
    assert relay.files("scheduled") == [entry_id]


@pytest.fixture
def idle_spool(tmp_path: Path) -> tuple[Path, Path]:
    """(config, spool path) of a relay that is not running."""
    config = relay_config(tmp_path, None, None)
    Spool(Path(config["spool"]["path"])).open()
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, Path(config["spool"]["path"])


def test_queue_lists_the_scheduled_state_and_send_time(idle_spool: tuple[Path, Path]) -> None:
    """JSON: state scheduled and send_at; table: the send time in the NEXT ATTEMPT column
    and a count of scheduled messages in the summary."""
    config, spool = idle_spool
    send_at = time.time() + 7200
    entry_id = store(spool, send_at)
    expected = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(send_at)))
    [item] = json.loads(run_cli(config, "queue", "--json").stdout)
    assert (item["id"], item["state"], item["send_at"]) == (entry_id, "scheduled", expected)
    lines = run_cli(config, "queue").stdout.splitlines()
    assert f"  scheduled    0  {expected}  <app@example.com>" in lines[1]
    assert lines[-1].endswith(", 1 scheduled")
    assert f"Send at:      {expected}" in run_cli(config, "queue", "show", entry_id).stdout
    listed = json.loads(run_cli(config, "queue", "--json", "--state", "scheduled").stdout)
    assert [i["id"] for i in listed] == [entry_id]


def test_hold_and_delete_take_scheduled_messages(idle_spool: tuple[Path, Path]) -> None:
    """hold and delete apply to scheduled messages."""
    config, spool = idle_spool
    held, deleted = store(spool, time.time() + 60), store(spool, time.time() + 60)
    assert run_cli(config, "queue", "hold", held).stdout == f"{held}: held\n"
    assert run_cli(config, "queue", "delete", deleted).stdout == \
        f"{deleted}: deleted (was scheduled)\n"
    assert sorted(p.name for p in (spool / "hold").iterdir()) == [held]
    assert list((spool / "scheduled").iterdir()) == []
